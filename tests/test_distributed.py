"""Data-parallel training: torchrun with 2 CPU processes (gloo) on the tiny model, against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from htmlgen_utils.config import Config
from htmlgen_utils.packing import make_dataloader
from htmlgen_utils.stages import prepare_data
from htmlgen_utils.train import plan_steps, run_training

REPO = Path(__file__).resolve().parent.parent
# 8 blocks a step in both: 2 processes x 2 micro-batches x 2 accumulated, or 1 process x 2 x 4
SETTINGS = dict(
    block_size=512,
    max_example_tokens=512,
    micro_batch_size=2,
    max_steps=4,
    eval_every=2,
    checkpoint_every=2,
    max_eval_batches=2,
    learning_rate=2e-3,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The bundled data split and packed once, for every run of this module."""
    folder = tmp_path_factory.mktemp("prepared")
    prepare_data(Config.from_preset("tiny", run_dir=str(folder), **SETTINGS))
    return folder


def fresh_run_dir(prepared: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    for part in ("data", "packed"):
        os.symlink(prepared / part, run_dir / part)
    return run_dir


def torchrun(run_dir: Path, writes: Path, stop_at: int | None = None, **overrides) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m htmlgen_utils.train`, through tests/ranked_train.py's watch."""
    writes.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HTMLGEN_TEST_RUN_DIR": str(run_dir),
        "HTMLGEN_TEST_WRITES": str(writes),
        "PYTHONPATH": str(REPO),
    }
    env.pop("HTMLGEN_TEST_STOP_AT", None)
    if stop_at is not None:
        env["HTMLGEN_TEST_STOP_AT"] = str(stop_at)
    options = [
        arg
        for key, value in {**SETTINGS, "gradient_accumulation_steps": 2, **overrides}.items()
        for arg in ("-p", key, json.dumps(value))
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "ranked_train.py"),
        "--preset",
        "tiny",
        "--run-dir",
        str(run_dir),
        *options,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def step_losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "history.json").read_text()) if "loss" in h]


def test_each_rank_takes_its_own_blocks_and_together_they_take_each_once():
    blocks = datasets.Dataset.from_dict(
        {name: [[i] * 4 for i in range(11)] for name in ("input_ids", "labels", "position_ids")}
    )
    seen = []
    for rank in (0, 1):
        ids = [
            row[0]
            for batch in make_dataloader(blocks, 1, shuffle=True, seed=3, epoch=1, rank=rank, world_size=2)
            for row in batch["input_ids"].tolist()
        ]
        assert len(ids) == 5  # 11 blocks: 5 each, the permutation's last one waits for the next epoch
        seen += ids
    assert len(set(seen)) == 10
    whole = [
        row[0]
        for batch in make_dataloader(blocks, 1, shuffle=True, seed=3, epoch=1)
        for row in batch["input_ids"].tolist()
    ]
    assert set(seen) == set(whole[:10])  # the same permutation, dealt out in turn
    assert plan_steps(11, Config.from_preset("tiny", gradient_accumulation_steps=2), world_size=2) == (2, 2, 32)


def test_two_processes_train_the_adapter_one_process_trains_on_the_same_global_batches(prepared, tmp_path):
    two = fresh_run_dir(prepared, tmp_path, "two")
    result = torchrun(two, tmp_path / "writes", lora_dropout=0.0)
    # it says what it does, once, and the summary records it
    assert (
        result.stdout.count(
            "data-parallel: 2 processes (gloo); a step = 2 block(s) x 2 micro-batches x 2 processes = 8 blocks"
        )
        == 1
    ), result.stdout[-2000:]
    assert json.loads((two / "training_summary.json").read_text())["world_size"] == 2
    # one all-reduce a step: every micro-batch but a step's last ran under no_sync (4 steps x (2 - 1)), and the
    # adapter below still equals one process's on the same global batches
    for rank in (0, 1):
        assert (tmp_path / "writes" / f"no_sync_rank{rank}.txt").read_text().split() == ["no_sync"] * 4
    one = fresh_run_dir(prepared, tmp_path, "one")
    run_training(
        Config.from_preset("tiny", run_dir=str(one), **SETTINGS, gradient_accumulation_steps=4, lora_dropout=0.0)
    )

    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-5)
    a, b = adapter(two), adapter(one)
    # fp32, the same to rounding: the processes' gradients are summed in another order (one all-reduce a step, after
    # both micro-batches), and 8-bit AdamW quantises its moments, so a rounding-level difference can move a moment
    # to its neighbouring code and that weight's step by a fraction of the learning rate (2e-3). Measured: 7 of
    # 315,392 weights differ by more than 1e-5 (at most 2.6e-4), the median by 2e-10
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert int((diffs > 1e-5).sum()) <= 1e-4 * diffs.numel() and float(diffs.max()) < 2e-3
    # the adapter moved: the comparison above is not between two untrained adapters
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    # rank 1 trained (the run ended) but wrote nothing under the run directory; rank 0 wrote the results
    assert not (tmp_path / "writes" / "rank1.txt").exists(), (tmp_path / "writes" / "rank1.txt").read_text()
    assert (two / "training_summary.json").exists() and (two / "checkpoints").is_dir()


def test_two_processes_resume_exactly_and_refuse_another_world_size(prepared, tmp_path):
    whole = fresh_run_dir(prepared, tmp_path, "whole")
    torchrun(whole, tmp_path / "writes")  # lora_dropout 0.05: each rank's dropout RNG must come back too
    resumed = fresh_run_dir(prepared, tmp_path, "resumed")
    torchrun(resumed, tmp_path / "writes", stop_at=2)
    assert (resumed / "checkpoints" / "step-000002").exists() and len(step_losses(resumed)) == 2
    with pytest.raises(ValueError, match=r"written by a run on 2 process\(es\) and this run has 1.*nproc_per_node 2"):
        run_training(Config.from_preset("tiny", run_dir=str(resumed), **SETTINGS, gradient_accumulation_steps=2))
    torchrun(resumed, tmp_path / "writes")

    assert step_losses(resumed) == step_losses(whole)
    a, b = adapter(resumed), adapter(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "writes" / "rank1.txt").exists()
