"""GGUF for llama.cpp, Ollama and LM Studio, written with `gguf`, llama.cpp's own Python package, from the merged
16-bit model one tensor at a time (RAM holds one tensor, never the model).

`f16` and `q8_0` are written here (gguf quantises q8_0 in numpy); `q4_k_m` needs llama.cpp's `llama-quantize` on
PATH (on Colab: `apt-get install -y llama.cpp`, or build llama.cpp and add `build/bin` to PATH), which this runs on
the f16 file. Beside each file, an Ollama `Modelfile` with the prompt template the model was trained on.

Architectures: Llama (1, 2, 3.x), Mistral (written as llama, as llama.cpp's converter does) and Qwen2 / Qwen2.5.
Differences from llama.cpp's `convert_hf_to_gguf.py` that matter: the tokenizer's pre-tokenizer is recognised from
its split regex (not from a hash of sample tokens), and its chat template is ours, the one the model was trained on.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from .packing import build_prompt

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> llama.cpp arch
PERMUTED_ROPE = {"llama"}  # llama.cpp's llama arch wants q/k rows interleaved per head (it rotates pairs, not halves)
CHAT_TEMPLATE = (  # our training prompt as a Jinja chat template: the user's message is the description
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + build_prompt("{{ message['content'] }}")
    + "{% endif %}{% endfor %}"
)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the model's index names (a hub repo may also hold a consolidated duplicate)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise ValueError(
        f"{folder} has no safetensors weights (model.safetensors or its index): the merge reads the base's "
        f"16-bit safetensors. Save the base with save_pretrained (safetensors is its default) and point model_id at it"
    )


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (its `LlamaModel.permute`); transformers' GGUF loader undoes it."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE, recognised from the tokenizer's split regex."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    regexes = [
        step["pattern"]["Regex"]
        for step in pre.get("pretokenizers", [pre])
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {})
    ]
    if not regexes:
        return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"
    known = {regex: name for name, regex in reversed(GGUF_PRE_TOKENIZER_SPLITS.items())}  # the first name wins
    if regexes[0] not in known:
        raise ValueError(
            "the tokenizer splits text with a regex llama.cpp has no name for: convert this model with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    return known[regexes[0]]


def vocabulary(model_dir: Path, n_vocab: int) -> tuple[str, str, list[bytes], list[float], list[int]]:
    """(tokenizer model, pre-tokenizer, tokens, scores, token types), padded to the embedding's rows."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    if (model_dir / "tokenizer.model").exists():
        vocab, pre = SentencePieceVocab(model_dir), "default"
    elif tokenizer_json["model"].get("byte_fallback"):
        vocab, pre = LlamaHfVocab(model_dir), "default"
    else:
        vocab, pre = BpeVocab(model_dir), pre_tokenizer_name(tokenizer_json)
    tokens, scores, types = map(list, zip(*vocab.all_tokens()))
    for special in AutoTokenizer.from_pretrained(model_dir).all_special_ids:  # <s>, </s>… inside the base vocabulary
        types[special] = gguf.TokenType.CONTROL
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens and the model's embedding only {n_vocab} rows")
    for index in range(len(tokens), n_vocab):  # rows no token uses (Qwen2.5 rounds its embedding up)
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return vocab.tokenizer_model, pre, tokens, scores, [int(t) for t in types]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_settings(config) -> dict:
    """RoPE's theta and scaling, from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    if getattr(config, "rope_parameters", None):
        return dict(config.rope_parameters)
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}


def llama3_rope_factors(config) -> torch.Tensor:
    """The per-frequency divisors of Llama-3.1's RoPE scaling, as llama.cpp reads them from `rope_freqs`."""
    scaling = rope_settings(config)
    head_dim = _head_dim(config)
    freqs = 1.0 / (scaling["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for wavelength in (2 * math.pi / freqs).tolist():
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str):
    import gguf

    if len(shape) == 1 or name == "rope_freqs.weight":
        return gguf.GGMLQuantizationType.F32  # norms, biases: small, and llama.cpp keeps them in f32
    if qtype == "q8_0" and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _tensors(model_dir: Path, config, arch: str):
    """(GGUF name, shape, loader) for each tensor, in file order; the loader permutes q/k rows where the arch wants."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"{key}: no GGUF name for this tensor of a {config.model_type} model")

                def load(file=file, key=key):
                    with safe_open(file, framework="pt") as reader:
                        tensor = reader.get_tensor(key).float()
                    if arch in PERMUTED_ROPE and key.endswith("q_proj.weight"):
                        tensor = _permute(tensor, heads)
                    elif arch in PERMUTED_ROPE and key.endswith("k_proj.weight"):
                        tensor = _permute(tensor, kv_heads)
                    return tensor

                yield name, handle.get_slice(key).get_shape(), load
    if rope_settings(config).get("rope_type") == "llama3":
        yield "rope_freqs.weight", [_head_dim(config) // 2], lambda: llama3_rope_factors(config)


def _add_metadata(writer, config, qtype: str, name: str) -> None:
    import gguf

    heads, head_dim = config.num_attention_heads, _head_dim(config)
    rope = rope_settings(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType[kind.upper()])
        writer.add_rope_scaling_factor(rope["factor"])
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):
        raise ValueError(f"RoPE scaling {kind!r} has no GGUF form: train with rope_scaling linear or yarn")
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model_dir: str | Path, out_file: str | Path, qtype: str = "q8_0") -> Path:
    """The merged model at `model_dir` as one GGUF file of type `qtype` (f16, q8_0, or q4_k_m via llama-quantize)."""
    import gguf
    from gguf.vocab import SpecialVocab
    from transformers import AutoConfig

    model_dir, out_file = Path(model_dir), Path(out_file)
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    if qtype == "q4_k_m":
        return _llama_quantize(model_dir, out_file)
    config = AutoConfig.from_pretrained(model_dir)
    arch = GGUF_ARCHES.get(config.model_type)
    if arch is None:
        raise ValueError(
            f"GGUF export knows {', '.join(GGUF_ARCHES)} models, not {config.model_type!r}: use llama.cpp's "
            f"convert_hf_to_gguf.py on {model_dir}"
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch)
    _add_metadata(writer, config, qtype, model_dir.parent.name or "htmlgen")
    model, pre, tokens, scores, types = vocabulary(model_dir, config.vocab_size)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = CHAT_TEMPLATE
    special.add_to_gguf(writer, quiet=True)
    # two passes over the weights: shapes and types for the header, then the data, one tensor in RAM at a time
    tensors = list(_tensors(model_dir, config, arch))
    for name, shape, _ in tensors:
        kind = _tensor_type(name, tuple(shape), qtype)
        byte_shape = (
            gguf.quant_shape_to_byte_shape(list(shape), kind) if kind == gguf.GGMLQuantizationType.Q8_0 else shape
        )
        itemsize = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(kind, 1)
        dtype = {4: np.float32, 2: np.float16, 1: np.uint8}[itemsize]
        writer.add_tensor_info(name, byte_shape, np.dtype(dtype), int(np.prod(byte_shape)) * itemsize, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, load in tensors:
            kind = _tensor_type(name, tuple(shape), qtype)
            array = load().numpy()
            if kind == gguf.GGMLQuantizationType.Q8_0:
                array = gguf.quants.quantize(array, kind)
            else:
                array = array.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.write_tensor_data(array)
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    partial.replace(out_file)
    return out_file


def _llama_quantize(model_dir: Path, out_file: Path) -> Path:
    binary = shutil.which("llama-quantize")
    if binary is None:
        raise ValueError(
            "q4_k_m needs llama.cpp's llama-quantize on PATH (Colab: build llama.cpp with cmake and add build/bin to "
            "PATH); gguf writes f16 and q8_0 without it: --gguf q8_0"
        )
    f16 = write_gguf(model_dir, out_file.with_name(out_file.name.replace("q4_k_m", "f16")), "f16")
    subprocess.run([binary, str(f16), str(out_file), "Q4_K_M"], check=True, capture_output=True)
    return out_file


def write_modelfile(gguf_file: str | Path) -> Path:
    """An Ollama Modelfile beside the GGUF: our prompt template and greedy decoding; the page ends at EOS (a stop
    string would be cut from the output, and `</html>` belongs to the page)."""
    gguf_file = Path(gguf_file)
    template = build_prompt("{{ .Prompt }}")
    text = f'FROM ./{gguf_file.name}\nTEMPLATE """{template}"""\nPARAMETER temperature 0\nPARAMETER num_predict 4096\n'
    path = gguf_file.with_suffix(".Modelfile")
    path.write_text(text)
    return path
