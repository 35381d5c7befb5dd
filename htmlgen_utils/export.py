"""What a finished run leaves behind: the adapter with its tokenizer, config and model card, an optional 16-bit merged
model (merged one shard at a time, so a 7B merge fits a free Colab's RAM), and an optional upload to the hub.

    python -m htmlgen_utils.export --run-dir runs/tiny --merge --gguf q8_0

writes the merged model, a GGUF file for llama.cpp / Ollama and an Ollama `Modelfile` beside it (gguf_export.py).
"""

from __future__ import annotations

import itertools
import json
import resource
import shutil
import time
from pathlib import Path

import torch

from .checkpoints import TrainState
from .config import Config
from .gguf_export import GGUF_TYPES, weight_files, write_gguf, write_modelfile
from .model import hf_token, load_tokenizer, saved_quantization
from .model_card import write_model_card

MERGE_SHARD_BYTES = 2 * 1024**3  # what the merge holds in RAM at once: one output shard of this size
BASE_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # the 16-bit weights, their index, config, tokenizer


def save_outputs(model, tokenizer, config: Config, state: TrainState, run_dir: str | Path) -> Path:
    """The adapter and the tokenizer in one folder, plus the exact config and the history, in the run dir."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    config.save(run_dir)
    config.save(adapter_dir)
    (run_dir / "history.json").write_text(json.dumps(state.history, indent=1) + "\n")
    return adapter_dir


def available_ram_bytes() -> int:
    """Memory the system can still give this process (Linux `MemAvailable`; elsewhere, no limit known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def merge_ram_bytes(model_id: str, dtype: torch.dtype = torch.float16, shard_bytes: int = MERGE_SHARD_BYTES) -> int:
    """RAM the sharded merge needs: one output shard, plus the largest tensor twice (read, then cast), plus 10%
    (counted on an empty 'meta' model, so nothing is downloaded but the config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_id, token=hf_token()))
    sizes = [p.numel() * torch.finfo(dtype).bits // 8 for p in model.parameters()]
    return int((min(shard_bytes, sum(sizes)) + 2 * max(sizes)) * 1.1)


def check_merge_possible(
    config: Config, dtype: torch.dtype = torch.float16, shard_bytes: int = MERGE_SHARD_BYTES
) -> None:
    """Refuse, before any training, a merge this machine cannot do: a base stored in 4-bit has no 16-bit weights
    to merge into, and even one shard at a time needs some RAM."""
    if saved_quantization(config.model_id) is not None:
        raise ValueError(
            f"merge_after_training: {config.model_id} is stored in 4-bit, and merging into 4-bit weights "
            f"is lossy. Merge into its 16-bit original (set model_id to it), or keep the adapter (serving and "
            f"notebook 05 use it on the 4-bit base): set merge_after_training false"
        )
    need, have = merge_ram_bytes(config.model_id, dtype, shard_bytes), available_ram_bytes()
    if need > have:
        raise ValueError(
            f"merge_after_training: merging into the 16-bit base needs about {need / 1e9:.1f} GB of RAM "
            f"and this machine has {have / 1e9:.1f} GB available. Set merge_after_training false (the "
            f"adapter is what serving and notebook 05 use) and merge later on a bigger machine: "
            f"python -m htmlgen_utils.export --run-dir RUN_DIR --merge"
        )


def base_snapshot(model_id: str) -> Path:
    """A local folder with the base's weights as safetensors: the path itself, or the hub's copy (downloaded once,
    to disk only)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=BASE_FILES, token=hf_token()))


def lora_deltas(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight name: (A, B, scale)} from a saved LoRA adapter; W' = W + scale * B @ A."""
    from safetensors.torch import load_file

    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if settings.get(k)]
    if unsupported:
        raise ValueError(
            f"{adapter_dir}: the sharded merge handles plain LoRA, and this adapter sets {', '.join(unsupported)}. "
            f"Merge it with peft's merge_and_unload on a machine with RAM for the whole base"
        )
    r, alpha = settings["r"], settings["lora_alpha"]
    scale = alpha / (r**0.5 if settings.get("use_rslora") else r)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            deltas[f"{module}.weight"] = (a, weights[key.replace(".lora_A.", ".lora_B.")], scale)
    return deltas


def _shard_plan(files: list[Path], dtype: torch.dtype, shard_bytes: int) -> list[list[tuple[Path, str]]]:
    """The base's tensors, in file order, grouped into output shards of at most `shard_bytes` each."""
    from safetensors import safe_open

    shards, size = [[]], 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                nbytes = torch.Size(handle.get_slice(key).get_shape()).numel() * torch.finfo(dtype).bits // 8
                if shards[-1] and size + nbytes > shard_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append((file, key))
                size += nbytes
    return shards


def merge_to_16bit(
    run_dir: str | Path, dtype: torch.dtype = torch.float16, shard_bytes: int = MERGE_SHARD_BYTES
) -> Path:
    """Merge the adapter into a *16-bit* copy of the base (merging into 4-bit weights would be lossy), one output
    shard at a time: read that shard's base tensors, add their LoRA deltas as peft's merge does, write, forget.
    Peak RAM is about one shard plus the adapter, not the whole model. Saved in `run_dir/merged`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    config = Config.load(run_dir)
    check_merge_possible(config, dtype, shard_bytes)
    deltas = lora_deltas(run_dir / "adapter")
    source = base_snapshot(config.model_id)
    plan = _shard_plan(weight_files(source), dtype, shard_bytes)
    partial, out = run_dir / "merged.partial", run_dir / "merged"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    weight_map, total = {}, 0
    for number, shard in enumerate(plan, 1):
        name = f"model-{number:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1 else "model.safetensors"
        tensors = {}
        for file, items in itertools.groupby(shard, key=lambda item: item[0]):  # the plan is in file order
            with safe_open(file, framework="pt") as handle:
                for _, key in items:
                    weight = handle.get_tensor(key).to(dtype)
                    if key in deltas:
                        a, b, scale = deltas.pop(key)
                        # as peft merges: the delta in fp32 added to the weight, the sum rounded once
                        weight = (weight.float() + (b.float() @ a.float()) * scale).to(dtype)
                    tensors[key] = weight.contiguous()
        save_file(tensors, partial / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if deltas:
        raise ValueError(f"the adapter changes {sorted(deltas)[:3]}..., which {config.model_id} does not have")
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model_config = json.loads((source / "config.json").read_text())
    model_config.pop("quantization_config", None)
    model_config["dtype"] = str(dtype).removeprefix("torch.")
    (partial / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.model"):  # the sentencepiece model, for GGUF's vocabulary
        if (source / extra).exists():
            shutil.copy(source / extra, partial / extra)
    load_tokenizer(str(run_dir / "adapter")).save_pretrained(partial)
    config.save(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    write_model_card(run_dir, out)
    return out


def push_adapter_to_hub(run_dir: str | Path, repo_id: str) -> str:
    """Upload the adapter folder, its model card included; needs a write token in HF_TOKEN (or the Colab secret)."""
    from huggingface_hub import HfApi

    token = hf_token()
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face write token: set HF_TOKEN (or the Colab secret HF_TOKEN)")
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=True)
    write_model_card(run_dir, Path(run_dir) / "adapter")
    api.upload_folder(folder_path=str(Path(run_dir) / "adapter"), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"


def folder_size(path: Path) -> str:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def peak_ram() -> str:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="What to take away from a trained run: the adapter's model card, a 16-bit merged model "
        "(one shard at a time), a GGUF file for llama.cpp / Ollama with its Modelfile."
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with adapter/ (notebook 04's output)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the 16-bit base (run/merged)")
    parser.add_argument("--gguf", choices=GGUF_TYPES, action="append", default=[], help="write run/gguf/*.gguf")
    parser.add_argument("--shard-gb", type=float, default=MERGE_SHARD_BYTES / 1024**3, help="merge shard size")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise ValueError(f"{run_dir} has no trained adapter (adapter/adapter_config.json): run notebook 04 first")
    start = time.perf_counter()
    card = write_model_card(run_dir, run_dir / "adapter")
    print(f"model card: {card}")
    merged = run_dir / "merged"
    if args.merge or (args.gguf and not (merged / "config.json").exists()):
        merged = merge_to_16bit(run_dir, shard_bytes=int(args.shard_gb * 1024**3))
        seconds = time.perf_counter() - start
        print(f"merged model: {merged} ({folder_size(merged)}, {seconds:.0f} s, peak RAM {peak_ram()})")
    for qtype in args.gguf:
        start = time.perf_counter()
        path = write_gguf(merged, run_dir / "gguf" / f"model-{qtype}.gguf", qtype)
        modelfile = write_modelfile(path)
        print(f"GGUF {qtype}: {path} ({folder_size(path)}, {time.perf_counter() - start:.0f} s, peak RAM {peak_ram()})")
        print(f"  Ollama: cd {path.parent} && ollama create htmlgen -f {modelfile.name} && ollama run htmlgen")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
