"""The shipped tiny base: its card and report agree with the files, and a rebuild follows the recorded curve."""

import json

import pytest

from htmlgen_utils.config import TINY_BASE_DIR
from htmlgen_utils.tiny_base import EARLY_STEPS, build


def test_shipped_base_is_small_and_documented():
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    weights = TINY_BASE_DIR / "model.safetensors"
    assert weights.stat().st_size < 12 * 2**20
    assert report["final_train_loss_last50"] < 0.2 and report["steps"] == len(report["loss_log"]) * 50
    card = (TINY_BASE_DIR / "README.md").read_text()
    assert str(report["final_train_loss_last50"]) in card and "python -m htmlgen_utils.tiny_base" in card


def test_rebuild_reproduces_the_recorded_loss_curve():
    """The first steps of the same recipe (seeded data, tokenizer, init and batches) give the recorded loss."""
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    rebuilt = build(None, stop_after=EARLY_STEPS)
    assert rebuilt["early_loss"] == pytest.approx(report["early_loss"], abs=0.01)


def test_shipped_long_page_base_is_the_tiny_base_further_trained_and_documented():
    """`tiny_base_long` shares the tiny base's architecture and tokenizer, has moved from its weights, and its
    card states what it saw."""
    from safetensors.torch import load_file

    from htmlgen_utils.config import TINY_LONG_BASE_DIR

    report = json.loads((TINY_LONG_BASE_DIR / "build_report.json").read_text())
    assert report["final_train_loss_last50"] < 0.2 and report["steps"] == len(report["loss_log"]) * 50
    assert report["long_pages"] >= 20 and (TINY_LONG_BASE_DIR / "model.safetensors").stat().st_size < 12 * 2**20
    assert (TINY_LONG_BASE_DIR / "tokenizer.json").read_bytes() == (TINY_BASE_DIR / "tokenizer.json").read_bytes()
    short, long = load_file(TINY_BASE_DIR / "model.safetensors"), load_file(TINY_LONG_BASE_DIR / "model.safetensors")
    assert short.keys() == long.keys() and any(not (short[k] == long[k]).all() for k in short)
    card = (TINY_LONG_BASE_DIR / "README.md").read_text()
    assert str(report["final_train_loss_last50"]) in card and "python -m htmlgen_utils.tiny_base --long" in card


def test_long_pages_of_the_long_page_base_stay_out_of_every_test_split_up_to_a_fifth():
    """The long-page base pre-trains on long pages: none may be a test page of the long set at the test fractions
    its card allows (the test rows come first in one seeded order, so a smaller fraction's test pages are a
    subset of the 0.2 split's)."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.tiny_base import long_pretraining_pages

    pretrained = set(long_pretraining_pages())
    assert len(pretrained) >= 20
    for fraction in (0.05, 0.1, 0.2):
        splits, _ = load_splits(Config.from_preset("tiny", dataset="bundled-long", test_fraction=fraction))
        assert not pretrained & set(splits["test"]["html"])
        assert not pretrained & set(splits["validation"]["html"])
