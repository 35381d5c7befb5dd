"""Experiment tracking with Weights & Biases: online with a key, otherwise off (or offline when asked).

Keys are read from the environment or Colab's secrets and handed to wandb through the environment; they are
never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config


def wandb_mode(config: Config) -> str:
    """`auto`: online when a key is available (env or Colab secret), otherwise disabled."""
    if config.wandb_mode != "auto":
        return config.wandb_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from google.colab import userdata  # type: ignore

        if userdata.get("WANDB_API_KEY"):
            os.environ["WANDB_API_KEY"] = userdata.get("WANDB_API_KEY")
            return "online"
    except Exception:
        pass
    return "disabled"


def start_wandb(config: Config, run_dir: Path):
    """A wandb run for training, or None when tracking is off."""
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=config.wandb_project,
        config=config.to_dict(),
        dir=str(run_dir),
        mode=mode,
        name=run_dir.name,
        resume="allow",
    )


def log_eval_table(config: Config, table, metrics: dict) -> None:
    """The per-page evaluation table and the scalar metrics, as their own wandb run (job type `eval`)."""
    mode = wandb_mode(config)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=config.wandb_project,
        mode=mode,
        dir=config.run_dir,
        name=Path(config.run_dir).name + "-eval",
        job_type="eval",
    )
    run.log(
        {
            "eval/table": wandb.Table(dataframe=table.drop(columns=["reference"])),
            **{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
    )
    run.finish()
