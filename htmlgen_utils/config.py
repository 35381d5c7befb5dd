"""One `Config` dataclass for every knob of the pipeline, with named presets.

Every artifact the pipeline writes is saved next to the exact `htmlgen_config.json` that produced it,
so a run directory can always be reproduced or served later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
BUNDLED_DATASET = "bundled"
BUNDLED_DATA_FILE = REPO_DIR / "data" / "html_pages.jsonl"  # regenerated in memory when absent (pip installs)
BUNDLED_LONG_DATASET = "bundled-long"  # 36 long pages (5k-40k characters) for the long-page path
BUNDLED_LONG_FILE = REPO_DIR / "data" / "long_pages.jsonl"
TINY_BASE_DIR = PACKAGE_DIR / "tiny_base"
TINY_LONG_BASE_DIR = PACKAGE_DIR / "tiny_base_long"  # the tiny base pre-trained further with long pages

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LOSS_SCALING = ("auto", "on", "off")
WANDB_MODES = ("disabled", "offline", "online", "auto")
LONG_PAGE_POLICIES = ("truncate_close", "truncate", "drop")
PAGE_CLEANING = ("none", "safe", "aggressive")
SWITCH_MODES = ("auto", "on", "off")
COMPILE_SWITCHES = ("compile_training", "compile_generation")
VERIFIED_CAPABILITY = (8, 0)  # the oldest GPU generation our compiled and custom-kernel paths have run on
ROPE_SCALING = ("auto", "none", "linear", "dynamic", "yarn")
# `auto` switches the long-block levers on from this block size (measured on the 7B shape, bench/RESULTS.md):
# below it the block mask is small and faster than per-example attention, and offloading the checkpoints costs
# speed; from it offloading is what lets a T4 train at all, and per-example attention saves memory at equal speed
LONG_BLOCK_TOKENS = 16384


@dataclass
class Config:
    """Every setting of a run. Create one with `Config.from_preset(name, **overrides)`."""

    preset: str = "custom"
    # --- model ---
    model_id: str = "meta-llama/Llama-2-7b-hf"  # hub id or local path of a Llama-architecture causal LM
    load_in_4bit: bool = True  # NF4 + double quantisation through bitsandbytes
    precision: str = "auto"  # auto | fp16 | bf16 | fp32: compute dtype and autocast mode
    gradient_checkpointing: bool = True
    loss_scaling: str = "auto"  # auto = GradScaler exactly when precision is fp16 | on | off
    rope_scaling: str = "auto"  # for examples longer than the model's context: auto (= linear when needed) | none |
    #                             linear | dynamic | yarn; the factor is max_example_tokens / max_position_embeddings
    # --- memory & speed levers (bench/RESULTS.md has what each measured) ---
    packed_attention: str = "auto"  # per-example attention, no block x block mask: auto = blocks >= 16384 | on | off
    flex_attention: str = "auto"  # block-sparse attention for packed blocks (FlexAttention; replaces the two above):
    #                               auto = blocks >= 4096 on CUDA GPUs of compute capability >= 8.0 | on | off
    loss_chunk_tokens: int = 1024  # vocabulary projection + loss this many tokens at a time; 0 = whole block
    embeddings_in_compute_dtype: bool = True  # keep the frozen embeddings/head in fp16/bf16, not fp32
    offload_activations: str = "auto"  # park layer checkpoints in CPU memory (CUDA): auto = blocks >= 16384 | on | off
    compile_training: str = "off"  # torch.compile each decoder layer for training (the first step compiles):
    #                                auto = on GPUs of compute capability >= 8.0 (where it was measured) | on | off
    memory_budget_gib: float = 0.0  # GPU memory training may plan for: layers whose activations fit are not
    #                                 checkpointed (less recompute); 0 = checkpoint every layer (the least memory)
    compile_generation: str = "off"  # static KV cache + compiled decode step (CUDA; first call compiles):
    #                                  auto = on GPUs of compute capability >= 8.0 | on | off
    # --- data ---
    dataset: str = BUNDLED_DATASET  # "bundled", a hub id, or a local .json/.jsonl/.csv file
    label_column: str = "label"  # the description column
    html_column: str = "html"  # the page column
    dataset_encoding: str = "utf-8"  # of a local dataset file (a byte-order mark is fine), e.g. latin-1, cp1252
    # scraped pages (cleaning.py): rows that cannot teach a page (not a page, a bot check, a consent wall, an error
    # page not asked for, nothing rendered) are dropped and counted; and what never renders is cleaned away
    drop_unteachable: bool = True
    page_cleaning: str = "safe"  # none | safe (renders the same; no bundled page changes) | aggressive
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    max_test_examples: int = 32  # held-out descriptions generated for in evaluation
    # --- prompts & packing ---
    block_size: int = 2048  # tokens per packed block
    max_example_tokens: int = 2048  # longer examples follow the long-page policy
    long_page_policy: str = "truncate_close"  # truncate_close (cut, close what is open, EOS) | truncate | drop
    loss_on_response_only: bool = True  # no loss on the instruction tokens
    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    # --- optimisation ---
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10  # optimiser steps of linear warm-up before the cosine decay
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    epochs: int = 1
    max_steps: int = -1  # optimiser steps; -1 = as many as the epochs give
    eval_every: int = -1  # optimiser steps between validation passes (and one at each epoch end); -1 = auto: a
    #                       quarter of the run's steps (`train.cadence`)
    max_eval_batches: int = 50  # cap on validation micro-batches per pass
    checkpoint_every: int = -1  # optimiser steps between resumable checkpoints; 0 = never; -1 = auto: a fifth of
    #                             the run's steps, so a run writes at least 4 before it ends (`train.cadence`)
    checkpoint_minutes: float = 10.0  # also a checkpoint once this many minutes passed since the last; 0 = by steps
    #                                   only. A disconnected Colab runtime loses at most this much training
    max_nan_steps: int = 5  # consecutive non-finite steps before the run stops with an error
    seed: int = 42
    # --- generation ---
    max_new_tokens: int = (
        0  # 0 = auto: the longest kept page of the data, in tokens, plus a margin (<= max_example_tokens)
    )
    generation_batch_size: int = 8
    repetition_penalty: float = 1.0  # >1 discourages repeated tokens; HTML repeats legitimately (measured: 1.0 best)
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size; 0 = off (HTML repeats its tags)
    stop_on_repetition: bool = True  # end a page whose last lines repeat one line (a generation stuck in a loop)
    # --- outputs ---
    run_dir: str = "runs/default"
    wandb_mode: str = "auto"  # auto = online with WANDB_API_KEY, else disabled
    wandb_project: str = "htmlgen"
    merge_after_training: bool = False  # also write a 16-bit merged model (needs RAM for the 16-bit base)
    push_to_hub: str = ""  # repo id to push the adapter to (needs HF_TOKEN); empty = never
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    def __post_init__(self) -> None:
        for name in COMPILE_SWITCHES:  # true/false (older saved configs, command lines) mean on/off
            if isinstance(getattr(self, name), bool):
                setattr(self, name, "on" if getattr(self, name) else "off")
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Reject impossible values with a message that names the field and the fix."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"Config.{name}={getattr(self, name)!r} is invalid: {why}")

        for name in (
            "block_size",
            "max_example_tokens",
            "lora_r",
            "lora_alpha",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "generation_batch_size",
            "max_test_examples",
            "max_eval_batches",
            "max_nan_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a whole number >= 1")
        for name in ("warmup_steps", "seed", "loss_chunk_tokens", "max_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a whole number >= 0")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            fail("max_steps", "must be -1 (use epochs) or a whole number >= 1")
        if (
            not isinstance(self.eval_every, int)
            or isinstance(self.eval_every, bool)
            or self.eval_every in (0,)
            or self.eval_every < -1
        ):
            fail("eval_every", "must be -1 (auto: a quarter of the run) or a whole number >= 1")
        if (
            not isinstance(self.checkpoint_every, int)
            or isinstance(self.checkpoint_every, bool)
            or self.checkpoint_every < -1
        ):
            fail("checkpoint_every", "must be -1 (auto: a fifth of the run), 0 (never) or a whole number >= 1")
        if (
            not isinstance(self.checkpoint_minutes, (int, float))
            or isinstance(self.checkpoint_minutes, bool)
            or self.checkpoint_minutes < 0
        ):
            fail("checkpoint_minutes", "must be a number of minutes >= 0 (0 = by steps only)")
        if self.block_size < 16:
            fail("block_size", "must be at least 16 tokens")
        if self.max_example_tokens > self.block_size:
            fail("max_example_tokens", f"must not exceed block_size ({self.block_size}): an example must fit a block")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 0.5:
                fail(name, "must be a fraction between 0 and 0.5")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "must be in [0, 1)")
        if not (isinstance(self.learning_rate, (int, float)) and 0.0 < self.learning_rate < 1.0):
            fail("learning_rate", "must be a positive number below 1")
        if not isinstance(self.repetition_penalty, (int, float)) or not 1.0 <= self.repetition_penalty <= 2.0:
            fail("repetition_penalty", "must be a number from 1.0 (off) to 2.0")
        if self.rope_scaling not in ROPE_SCALING:
            fail("rope_scaling", f"must be one of {ROPE_SCALING}")
        if (
            not isinstance(self.memory_budget_gib, (int, float))
            or isinstance(self.memory_budget_gib, bool)
            or self.memory_budget_gib < 0
        ):
            fail("memory_budget_gib", "must be a number of GiB >= 0 (0 = checkpoint every layer)")
        if self.max_grad_norm <= 0:
            fail("max_grad_norm", "must be positive")
        if self.precision not in PRECISIONS:
            fail("precision", f"must be one of {PRECISIONS}")
        if self.loss_scaling not in LOSS_SCALING:
            fail("loss_scaling", f"must be one of {LOSS_SCALING}")
        for name in ("offload_activations", "packed_attention", "flex_attention", *COMPILE_SWITCHES):
            if getattr(self, name) not in SWITCH_MODES:
                fail(name, f"must be one of {SWITCH_MODES}")
        for name in ("embeddings_in_compute_dtype", "stop_on_repetition"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if self.wandb_mode not in WANDB_MODES:
            fail("wandb_mode", f"must be one of {WANDB_MODES}")
        if self.long_page_policy not in LONG_PAGE_POLICIES:
            fail("long_page_policy", f"must be one of {LONG_PAGE_POLICIES}")
        if self.page_cleaning not in PAGE_CLEANING:
            fail("page_cleaning", f"must be one of {PAGE_CLEANING}")
        for name in ("model_id", "dataset", "label_column", "html_column", "run_dir", "dataset_encoding"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                fail(name, "must be a non-empty string")
        if Path(self.run_dir).expanduser().is_file():
            fail("run_dir", "is a file: give a folder (it is created when missing)")
        if self.label_column == self.html_column:
            fail("html_column", "must differ from label_column")

    # ------------------------------------------------------------------ presets & I/O
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Config":
        """A preset with some fields replaced; unknown field names are an error."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values["preset"] = name
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown Config field(s) {sorted(unknown)}; valid fields: {cls.field_names()}")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def long_block_lever(self, name: str) -> bool:
        """Whether an `auto | on | off` lever (`offload_activations`, `packed_attention`) is on for this run."""
        value = getattr(self, name)
        return value == "on" or (value == "auto" and self.block_size >= LONG_BLOCK_TOKENS)

    def compiles(self, name: str) -> bool:
        """Whether a compile switch (`compile_training`, `compile_generation`) is on for this machine: `auto` only
        on GPUs where the compiled path has run (`gpu_is_verified`)."""
        value = getattr(self, name)
        return value == "on" or (value == "auto" and gpu_is_verified())

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (a directory gets `htmlgen_config.json` inside it)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "htmlgen_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "htmlgen_config.json"
        if not path.exists():
            raise FileNotFoundError(
                f"No config at {path}: run the training notebook (04) or `python -m htmlgen_utils.train` first"
            )
        data = json.loads(path.read_text())
        unknown = set(data) - set(cls.field_names())
        if unknown:
            raise ValueError(f"{path} has unknown Config field(s) {sorted(unknown)}")
        return cls(**data)

    @staticmethod
    def parse_value(text: str) -> Any:
        """Turn a command-line string into a JSON value when it is one ("3" -> 3, "true" -> True)."""
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def choose_preset() -> tuple[str, str]:
    """The preset that fits this machine, and why: `tiny` without a CUDA GPU (`colab-t4` on a Colab CPU runtime, for
    notebooks 01-02, which need no GPU), `ampere-bf16` from compute
    capability 8.0 (Ampere: native bfloat16), `colab-t4` below it (a T4 is sm_75).

    Not `torch.cuda.is_bf16_supported()`: it is True on a T4 too, because it counts bfloat16 *emulation*, which
    runs far slower than fp16 there."""
    import torch

    if not torch.cuda.is_available():
        import sys

        if "google.colab" in sys.modules:  # a CPU runtime on Colab: notebooks 01-02 need only the tokenizer
            return "colab-t4", (
                "no GPU in this Colab runtime: the T4 preset's tokenizer and blocks, so notebooks 01 "
                "and 02 can run here; 03-05 need a T4 runtime"
            )
        return "tiny", "no CUDA GPU: the tiny CPU model and the bundled data"
    major, minor = torch.cuda.get_device_capability(0)
    gpu = f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    if major >= 8:
        return "ampere-bf16", f"{gpu} computes in bfloat16 natively"
    return "colab-t4", f"{gpu} has no native bfloat16: float16 with a GradScaler"


def default_preset() -> str:
    """The preset that fits this machine (see `choose_preset`)."""
    return choose_preset()[0]


def gpu_capability() -> tuple[int, int] | None:
    """The CUDA GPU's compute capability, or None without one."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def gpu_is_verified() -> bool:
    """A GPU of compute capability >= `VERIFIED_CAPABILITY`: the compiled, captured and custom-kernel paths have run
    on such GPUs. Below it (a T4 is 7.5) none has, so `auto` leaves them off; `on` opts in."""
    capability = gpu_capability()
    return capability is not None and capability >= VERIFIED_CAPABILITY


def gpu_has_native_bf16() -> bool:
    """Compute capability 8.0 or newer (Ampere): bfloat16 in hardware, not emulated."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8


# fmt: off
PRESETS: dict[str, dict[str, Any]] = {  # each lists only what it changes from the defaults above
    # Free Colab T4: no native bf16, so fp16 with a GradScaler; whole examples up to Llama-2's native 4,096 tokens;
    # a T4 is bound by arithmetic, so the memory it has to spare (13 of its ~14.6 usable) buys layers without
    # checkpoint recompute.
    "colab-t4": dict(
        precision="fp16", block_size=4096, max_example_tokens=4096, compile_training="auto", memory_budget_gib=13.0,
        compile_generation="auto", run_dir="runs/colab-t4",
    ),
    # The T4 preset in the least memory: every layer checkpointed, the checkpoints parked in CPU memory. For long
    # examples (with RoPE scaling) and small GPUs; bench/RESULTS.md has its memory.
    "colab-t4-low-memory": dict(
        precision="fp16", block_size=4096, max_example_tokens=4096, compile_training="auto",
        offload_activations="on", compile_generation="auto", run_dir="runs/colab-t4",
    ),
    # Ampere or newer (A100, L4, H100): bf16 needs no loss scaling, so a bigger micro-batch.
    "ampere-bf16": dict(
        precision="bf16", micro_batch_size=4, generation_batch_size=32, compile_training="auto",
        memory_budget_gib=20.0, compile_generation="auto", run_dir="runs/ampere-bf16",
    ),
    # The small pre-trained Llama shipped with the package, on CPU: what tests, CI and GPU-less machines run.
    # Blocks of 1,024 tokens: twice the optimiser steps of 2,048 in the same time.
    "tiny": dict(
        model_id=str(TINY_BASE_DIR), precision="fp32", gradient_checkpointing=False, block_size=1024,
        max_example_tokens=1024, learning_rate=2e-3, warmup_steps=3, max_steps=32, eval_every=16, max_eval_batches=6,
        checkpoint_every=16, max_test_examples=12, generation_batch_size=12, run_dir="runs/tiny",
        wandb_mode="disabled",
    ),
    # The tiny chain on long pages (`bundled-long`, 5k-33k characters), on the tiny base that has also seen long
    # pages: examples of 2,048 tokens (the default), twice its context (linear RoPE scaling), a fifth of the pages
    # for testing (7 of 36, which its pre-training left out) and 128 steps (measured: after 32 no page ended
    # before the token limit).
    "tiny-long": dict(
        model_id=str(TINY_LONG_BASE_DIR), dataset=BUNDLED_LONG_DATASET, test_fraction=0.2, precision="fp32",
        gradient_checkpointing=False, learning_rate=2e-3, warmup_steps=3,
        max_steps=128, eval_every=32, max_eval_batches=6, checkpoint_every=32, max_test_examples=12,
        generation_batch_size=12, run_dir="runs/tiny-long", wandb_mode="disabled",
    ),
}
# fmt: on
