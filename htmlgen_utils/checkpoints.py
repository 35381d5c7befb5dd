"""Resumable checkpoints: where the run is, and everything a restarted run needs to continue the same trajectory.

A checkpoint holds the adapter, the optimiser, the schedule, the GradScaler, every RNG and the position in the
data; it is written to a temporary folder and renamed into place, so an interruption never leaves half of one.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .distributed import SINGLE, Ranks, gather_to_main

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE = "training_state.pt"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a restarted run continues the same trajectory."""

    step: int = 0  # optimiser steps done (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    history: list = field(default_factory=list)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, scaler, state: TrainState, ranks: Ranks = SINGLE
) -> Path | None:
    """Adapter + optimiser + schedule + scaler + RNG + data position, written to a temporary folder and
    renamed into place, so an interruption never leaves a half-written checkpoint behind.

    Over several processes every rank calls it: rank 0 collects each rank's RNG (their dropout masks differ) and
    writes; the adapter, optimiser and scaler are the same on every rank (they take the same steps)."""
    rng = gather_to_main(_rng_state(), ranks)
    if not ranks.is_main:
        return None
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_per_rank": rng,
            "world_size": ranks.world_size,
            "state": asdict(state),
        },
        tmp / TRAINING_STATE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.glob("step-*"):  # keep only the newest checkpoint
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("step-*"))
    found = [p for p in found if (p / TRAINING_STATE).exists()]
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, ranks: Ranks = SINGLE) -> TrainState:
    """Restore everything `save_checkpoint` wrote. A checkpoint continues only under the number of processes
    that wrote it: each rank's place in the data is its share of the blocks, which depends on that number."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = torch.load(path / TRAINING_STATE, weights_only=False)
    written_by = saved.get("world_size", 1)
    if written_by != ranks.world_size:
        raise ValueError(
            f"The checkpoint {path} was written by a run on {written_by} process(es) and this run has "
            f"{ranks.world_size}: resume with the same number (torchrun --nproc_per_node {written_by} "
            f"..., or without torchrun for 1), or train anew with --fresh-start"
        )
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng_per_rank"][ranks.rank] if "rng_per_rank" in saved else saved["rng"])
    return TrainState(**saved["state"])


def cadence(config: Config, total_steps: int) -> tuple[int, int]:
    """(checkpoint every, validate every) in optimiser steps. `auto` (-1) checkpoints every fifth of the run, so a
    run of 5 steps or more writes at least 4 checkpoints before it ends (a disconnect loses at most a fifth; the
    `checkpoint_minutes` rule bounds it in time too), and validates every quarter (plus each epoch's end)."""
    checkpoint = max(1, total_steps // 5) if config.checkpoint_every == -1 else config.checkpoint_every
    validate = max(1, total_steps // 4) if config.eval_every == -1 else config.eval_every
    return checkpoint, validate


def describe_cadence(config: Config, total_steps: int) -> str:
    """One line for the plan: when checkpoints and validation happen."""
    checkpoint, validate = cadence(config, total_steps)
    if not checkpoint:
        saves = "no checkpoints (checkpoint_every=0): an interrupted run starts over"
    else:
        minutes = f" and after every {config.checkpoint_minutes:g} minutes" if config.checkpoint_minutes else ""
        saves = f"a checkpoint every {checkpoint} step(s){minutes} (a restarted run resumes from the last)"
    return f"{saves}; validation every {validate} step(s) and at the end"
