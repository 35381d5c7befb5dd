"""Stage 3: load the base model in 4-bit NF4, find its linear layers, and wrap them with LoRA.

QLoRA keeps the frozen base weights in 4-bit NF4 (double-quantised: the quantisation constants are
quantised too) and trains small low-rank adapters in higher precision on top of every linear layer.
The compute dtype follows the hardware: a T4 has no bfloat16, so float16 there (with loss scaling in
the training loop), bfloat16 on Ampere or newer, float32 on CPU.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .colab import colab_secret
from .config import Config, gpu_has_native_bf16

UNGATED_COPY = "NousResearch/Llama-2-7b-hf"  # the same Llama-2-7B weights, no licence gate

# peft (0.21) wraps a model by reading its `is_gradient_checkpointing`, which transformers 5 deprecates in favour of
# `is_activation_checkpointing` and warns about on every read: a warning about library internals a user can't act on
# (notebook 03 calls `get_peft_model` in its own cell), so this one message is silenced.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def gated_help(model: str) -> str:
    """What to do when `model` can't be fetched, in the words of where we run (a notebook or a command line)."""
    in_notebook = "ipykernel" in sys.modules
    switch = (
        f'overrides={{"model_id": "{UNGATED_COPY}"}} in the parameters cell'
        if in_notebook
        else f"-p model_id {UNGATED_COPY}"
    )
    where = (
        "add a Colab secret named HF_TOKEN (key icon in the sidebar, allow this notebook)"
        if in_notebook
        else "set HF_TOKEN in the environment"
    )
    return (
        f"{model} is gated or could not be fetched. Accept its licence on huggingface.co and {where}; or use an "
        f"ungated copy of the same weights: {switch}."
    )


def hf_token() -> str | None:
    """The Hugging Face token from the environment or Colab secrets; never printed."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or colab_secret("HF_TOKEN")


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 on GPUs with native bfloat16 (compute capability >= 8.0), fp16 on older GPUs (T4), fp32 on
    CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if gpu_has_native_bf16() else "fp16"
    return "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision(precision)]


def device_for(config: Config) -> torch.device:
    """CUDA when present; a GPU-only precision on a machine without one is a clear error."""
    precision = resolve_precision(config.precision)
    if torch.cuda.is_available():  # under torchrun, the GPU of this process's local rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if precision in ("fp16", "bf16"):
        raise RuntimeError(
            f"Preset {config.preset!r} uses {precision} on a CUDA GPU, and this machine has none. On Colab: Runtime -> "
            f"Change runtime type -> T4 GPU. Without a GPU use the CPU preset: --preset tiny."
        )
    return torch.device("cpu")


def device_name() -> str:
    """What trained the model, for the run's summary and its model card."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def autocast_context(precision: str, device: torch.device):
    """Mixed precision for the forward pass: fp16/bf16 autocast on GPU, nothing on CPU/fp32."""
    precision = resolve_precision(precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))


def quantization_config(config: Config) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(config.precision),
    )


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")  # Llama-3.x's spare special tokens


def load_tokenizer(model_id: str):
    """The base model's tokenizer with a pad token. Llama-2 and Mistral have none: we reuse UNK; Llama-3.x has no
    UNK either: one of its spare special tokens. Only where there is neither (or the model names it, as Qwen2.5
    does) is pad EOS: padding never carries a label and generation cuts each page at its first EOS, so even then
    padding is never taken for the end of a page."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, token=hf_token())
    except OSError as error:
        raise OSError(f"{gated_help(model_id)} ({error})") from error
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        spare = next((token for token in PAD_CANDIDATES if token in vocab), None)
        tokenizer.pad_token = tokenizer.unk_token or spare or tokenizer.eos_token
    # Pages run to tens of thousands of tokens; lengths are ours to manage (long-page policy, RoPE scaling), so the
    # tokenizer's warning about sequences over the model's context would only be noise.
    tokenizer.model_max_length = 10**9
    return tokenizer


def rope_scaling(config: Config, model_config) -> dict | None:
    """The rotary-embedding scaling that lets the model see examples of `max_example_tokens` when that is more than
    its context (`max_position_embeddings`: 4,096 for Llama-2): `linear` (position interpolation, the default for
    `auto`), `dynamic` (NTK) or `yarn`, with factor = max_example_tokens / context. None when none is needed."""
    context = model_config.max_position_embeddings
    factor = config.max_example_tokens / context
    if config.rope_scaling == "none" or factor <= 1.0:
        return None
    kind = "linear" if config.rope_scaling == "auto" else config.rope_scaling
    parameters = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        parameters["original_max_position_embeddings"] = context
    return parameters


def model_config_for(config: Config):
    """The checkpoint's model config, with the RoPE scaling `config` asks for (transformers 5 keeps it in
    `rope_parameters`, 4.x in `rope_scaling`)."""
    model_config = _checkpoint_config(config.model_id)
    scaling = rope_scaling(config, model_config)
    if scaling is not None:
        current = getattr(model_config, "rope_parameters", None)
        if isinstance(current, dict):
            model_config.rope_parameters = {**current, **scaling}
        else:
            model_config.rope_scaling = scaling
        if scaling["rope_type"] in ("linear", "yarn"):  # their frequencies depend on the factor, not on this:
            # the context is now the scaled one (`generate` warns about every token past the old one otherwise);
            # `dynamic` reads the original context from this field, so it keeps it
            model_config.max_position_embeddings = config.max_example_tokens
    return model_config


def _checkpoint_config(model_id: str):
    """The checkpoint's own model config (config.json), with the gated-model help when it can't be fetched."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, token=hf_token())
    except OSError as error:
        raise OSError(f"{gated_help(model_id)} ({error})") from error


def _quantization_of(model_config) -> dict | None:
    found = getattr(model_config, "quantization_config", None)
    if found is None:
        return None
    return found if isinstance(found, dict) else found.to_dict()


def saved_quantization(model_id: str) -> dict | None:
    """The bitsandbytes settings a checkpoint was saved with (an already-4-bit model, e.g. a hub `...-bnb-4bit`
    repo: a ~4 GB download instead of 13.5 GB), or None for a 16/32-bit checkpoint."""
    return _quantization_of(_checkpoint_config(model_id))


def load_base_model(config: Config, quantize: bool | None = None):
    """The base causal LM, in 4-bit NF4 when `config.load_in_4bit` (the QLoRA path, also on CPU). A checkpoint
    saved in 4-bit loads as it is, computing in this machine's dtype (fp16 on a T4), whatever dtype it was
    saved to compute in."""
    device = device_for(config)
    quantize = config.load_in_4bit if quantize is None else quantize
    kwargs = dict(
        dtype=compute_dtype(config.precision),
        token=hf_token(),
        device_map={"": device.index} if device.type == "cuda" else "cpu",
    )
    kwargs["config"] = model_config_for(config)
    prequantized = _quantization_of(kwargs["config"])
    if prequantized is not None and not prequantized.get("load_in_4bit"):
        raise ValueError(
            f"{config.model_id} is saved quantised ({prequantized.get('quant_method')}), but not in "
            f"bitsandbytes 4-bit: use its 16-bit original or a '...-bnb-4bit' checkpoint"
        )
    if quantize and prequantized is None:
        kwargs["quantization_config"] = quantization_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model_id, **kwargs)
    except OSError as error:
        raise OSError(f"{gated_help(config.model_id)} ({error})") from error
    model.config.use_cache = False  # training; generation turns it back on
    if prequantized is not None:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype = compute_dtype(config.precision)
    return model


def find_linear_layer_names(model) -> list[str]:
    """Short names of every linear layer (4-bit or not) except the output head, for LoRA's target_modules."""
    import bitsandbytes as bnb

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, torch.nn.Linear)):
            short = full_name.split(".")[-1]
            if short != "lm_head":
                names.add(short)
    return sorted(names)


def create_peft_config(target_modules: list[str], config: Config) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model, config: Config, lora_config: LoraConfig | None = None):
    """k-bit preparation (frozen base, norms in fp32, checkpointing), then LoRA: `lora_config` when given (notebook
    03 passes the one it shows), otherwise `create_peft_config` on every linear layer."""
    if getattr(model, "is_loaded_in_4bit", False):
        prepare_4bit_for_training(model, config)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)  # the adapters' random initialisation is part of the run's recipe
    model = get_peft_model(model, lora_config or create_peft_config(find_linear_layer_names(model), config))
    _keep_cpu_4bit_layers_differentiable(model)
    return model


def prepare_4bit_for_training(model, config: Config) -> None:
    """What peft's `prepare_model_for_kbit_training` does, minus one cost: freeze the base, cast its
    non-quantised weights (the norms) to fp32 for stability, and turn on gradient checkpointing (non-reentrant,
    so the inputs need no `requires_grad` hook).

    With `embeddings_in_compute_dtype` the embeddings and head are never upcast at all (peft upcasts every
    non-quantised weight, so casting them back afterwards still passes through fp32 copies of both: for
    Llama-2-7B a load-time peak above a whole 2048-token training step's)."""
    keep = set()
    if config.embeddings_in_compute_dtype:
        keep = {
            id(p)
            for module in (model.get_input_embeddings(), model.get_output_embeddings())
            if module is not None
            for p in module.parameters()
        }
    for parameter in model.parameters():
        parameter.requires_grad = False
        if (
            parameter.dtype in (torch.float16, torch.bfloat16)
            and id(parameter) not in keep
            and parameter.__class__.__name__ != "Params4bit"
        ):
            parameter.data = parameter.data.to(torch.float32)
    if keep:
        keep_frozen_embeddings_in(model, compute_dtype(config.precision))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_frozen_embeddings_in(model, dtype: torch.dtype) -> None:
    """Keep the frozen input embeddings and output head in the compute dtype (fp16/bf16), not fp32.

    In fp32 they would cost twice the memory (2 x 32000 x 4096 weights for Llama-2-7B), a fp16 copy of the head
    that autocast makes on every forward, and a fp32 residual stream (so every layer checkpoint is twice the size).
    Both stay frozen and autocast runs the head in fp16/bf16 anyway, so the loss is unchanged within rounding.
    """
    if dtype == torch.float32:
        return
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and not module.weight.requires_grad:
            module.to(dtype)
    head = model.get_output_embeddings()
    if head is not None:  # the fp32 final norm feeds it; outside autocast (generation) match the head's dtype
        head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def _keep_cpu_4bit_layers_differentiable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster inference kernel the first time
    a layer runs in eval mode without gradients, and never packs them back; that kernel has no backward, so
    training after a validation pass would silently lose the gradients flowing through the frozen layers.
    Training on CPU therefore keeps the standard layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_for_training(config: Config):
    """Tokenizer and the 4-bit base wrapped with fresh LoRA adapters, ready for the loop."""
    tokenizer = load_tokenizer(config.model_id)
    model = prepare_for_training(load_base_model(config), config)
    return model, tokenizer


def load_trained(run_dir: str | Path, adapter: bool = True, config: Config | None = None):
    """Base (+ the run's adapter) for generation, in eval mode with the KV cache on."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if adapter and not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"No trained adapter in {adapter_dir}: run notebook 04_training_loop first with the "
            f"same run_dir (or python -m htmlgen_utils.train --run-dir {run_dir}); it trains the "
            f"adapter, the part of the series that takes longest (on a T4: the README's time "
            f"table)"
        )
    config = config or Config.load(run_dir)
    tokenizer = load_tokenizer(str(adapter_dir) if adapter else config.model_id)
    model = load_base_model(config)
    if adapter:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, config


@dataclass
class ParameterSummary:
    trainable: int
    total: int
    memory_bytes: int
    lora_modules: list[str]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} of {self.total:,} parameters ({self.trainable_percent:.3f}%), "
            f"model memory {self.memory_bytes / 2**30:.3f} GiB, LoRA on {self.lora_modules}"
        )


def parameter_summary(model) -> ParameterSummary:
    """Trainable vs all parameters (4-bit weights counted as the values they hold) and memory footprint."""
    trainable, total = model.get_nb_trainable_parameters()
    modules = sorted(getattr(model, "peft_config", {}).get("default", LoraConfig()).target_modules or [])
    return ParameterSummary(trainable, total, model.get_memory_footprint(), modules)
