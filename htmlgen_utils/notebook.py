"""Helpers the notebooks share: turning the parameters cell into a `Config`, and small display tables."""
from __future__ import annotations

from .config import Config

def setup(preset: str = "auto", run_dir: str = "runs/notebooks", dataset: str = "bundled",
          overrides: dict | None = None) -> Config:
    """The run's `Config` from a notebook's parameters. `preset="auto"` picks what fits this machine:
    `colab-t4` on a T4 (Colab's free GPU), `ampere-bf16` on bf16-capable GPUs, `tiny` without a GPU."""
    from .config import choose_preset

    chosen = preset
    if preset == "auto":
        chosen, why = choose_preset()
        print(f"preset 'auto' -> {chosen!r}: {why}")
    config = Config.from_preset(chosen, run_dir=run_dir, dataset=dataset, **(overrides or {}))
    return config


def config_table(config: Config, fields: tuple[str, ...] = (
        "preset", "model_id", "dataset", "precision", "block_size", "micro_batch_size", "gradient_accumulation_steps",
        "learning_rate", "max_steps", "lora_r", "lora_alpha", "run_dir")):
    import pandas as pd

    return pd.DataFrame({"value": [str(getattr(config, f)) for f in fields]}, index=list(fields))


def compare_table(metrics: dict, keys: tuple[str, ...] = (
        "rouge1", "rouge2", "rougeL", "text_rougeL", "tag_similarity", "html_valid_rate", "token_accuracy",
        "eval_loss")):
    """Fine-tuned vs the same base without the adapter, side by side."""
    import pandas as pd

    base = metrics.get("base_model", {})
    return pd.DataFrame({"fine-tuned": [metrics.get(k) for k in keys], "base model": [base.get(k) for k in keys]},
                        index=list(keys)).round(4)
