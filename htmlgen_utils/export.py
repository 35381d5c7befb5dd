"""What a finished run leaves behind: the adapter with its tokenizer and config, an optional 16-bit merged model,
and an optional upload to the hub."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import TrainState
from .config import Config
from .model import hf_token, load_tokenizer


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


def merge_to_16bit(run_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Merge the adapter into a *16-bit* copy of the base (merging into 4-bit weights would be lossy) and save it
    in `run_dir/merged`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    config = Config.load(run_dir)
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
