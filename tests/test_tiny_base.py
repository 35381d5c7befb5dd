"""The shipped tiny base: its card and report agree with the files, and a rebuild follows the recorded curve."""
import json

import pytest

from htmlgen_utils.config import TINY_BASE_DIR
from htmlgen_utils.tiny_base import build


def test_shipped_base_is_small_and_documented():
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    weights = TINY_BASE_DIR / "model.safetensors"
    assert weights.stat().st_size < 12 * 2**20
    assert report["final_train_loss_last50"] < 0.2 and report["steps"] == len(report["loss_log"]) * 50
    card = (TINY_BASE_DIR / "README.md").read_text()
    assert str(report["final_train_loss_last50"]) in card and "python -m htmlgen_utils.tiny_base" in card


def test_rebuild_reproduces_the_recorded_loss_curve():
    """The first 50 steps of the same recipe (seeded data, tokenizer, init and batches) give the recorded loss."""
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    rebuilt = build(None, stop_after=50)
    assert rebuilt["loss_log"][0] == pytest.approx(report["loss_log"][0], abs=0.05)
