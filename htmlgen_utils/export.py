"""What a finished run leaves behind: the adapter with its tokenizer and config, an optional 16-bit merged model,
and an optional upload to the hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import TrainState
from .config import Config
from .model import hf_token, load_tokenizer, saved_quantization


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


def merge_ram_bytes(model_id: str, dtype: torch.dtype = torch.float16) -> int:
    """RAM a 16-bit merge needs: the base's parameters at 2 bytes each, plus 10% for the adapter and buffers
    (counted on an empty 'meta' model, so nothing is downloaded but the config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_id, token=hf_token()))
    return int(sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8 * 1.1)


def check_merge_possible(config: Config, dtype: torch.dtype = torch.float16) -> None:
    """Refuse, before any training, a merge this machine cannot do: a base stored in 4-bit has no 16-bit weights
    to merge into, and a 7B base needs ~15 GB of RAM in 16-bit (a free Colab has ~12.7 GB)."""
    if saved_quantization(config.model_id) is not None:
        raise ValueError(
            f"merge_after_training: {config.model_id} is stored in 4-bit, and merging into 4-bit weights "
            f"is lossy. Merge into its 16-bit original on a machine with enough RAM, or keep the "
            f"adapter (serving and notebook 05 use it on the 4-bit base): set merge_after_training false"
        )
    need, have = merge_ram_bytes(config.model_id, dtype), available_ram_bytes()
    if need > have:
        raise ValueError(
            f"merge_after_training: merging into the 16-bit base needs about {need / 1e9:.1f} GB of RAM "
            f"and this machine has {have / 1e9:.1f} GB available. Set merge_after_training false (the "
            f"adapter is what serving and notebook 05 use) and merge later on a bigger machine: "
            f"python -m htmlgen_utils.export --run-dir RUN_DIR"
        )


def merge_to_16bit(run_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Merge the adapter into a *16-bit* copy of the base (merging into 4-bit weights would be lossy) and save it
    in `run_dir/merged`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    config = Config.load(run_dir)
    check_merge_possible(config, dtype)
    base = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=dtype, token=hf_token())
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    out = run_dir / "merged"
    merged.save_pretrained(out)
    load_tokenizer(str(run_dir / "adapter")).save_pretrained(out)
    return out


def push_adapter_to_hub(run_dir: str | Path, repo_id: str) -> str:
    """Upload the adapter folder; needs a write token in HF_TOKEN (or the Colab secret)."""
    from huggingface_hub import HfApi

    token = hf_token()
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face write token: set HF_TOKEN (or the Colab secret HF_TOKEN)")
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(Path(run_dir) / "adapter"), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Merge a trained run's adapter into its 16-bit base model.")
    parser.add_argument("--run-dir", required=True, help="a run directory with adapter/ (notebook 04's output)")
    args = parser.parse_args(argv)
    print(f"merged model saved in {merge_to_16bit(args.run_dir)}")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
