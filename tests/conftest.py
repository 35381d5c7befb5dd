"""Shared fixtures: the bundled rows, a small random-init tiny Llama built locally, and configs for it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from htmlgen_utils.config import BUNDLED_DATA_FILE, REPO_DIR, TINY_BASE_DIR, Config  # noqa: E402


@pytest.fixture(scope="session")
def bundled_rows():
    with open(BUNDLED_DATA_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory, bundled_rows):
    """A randomly initialised 2-layer Llama with a tokenizer trained on the bundled data (built in seconds)."""
    from htmlgen_utils.tiny_model import build_tiny_llama

    out = tmp_path_factory.mktemp("random-tiny-llama")
    texts = [r["label"] for r in bundled_rows] + [r["html"] for r in bundled_rows]
    return str(build_tiny_llama(out, texts, vocab_size=1024))


@pytest.fixture
def tiny_config(tmp_path, random_tiny_model):
    """The tiny preset pointed at the random model, with a small block and few steps."""
    return Config.from_preset(
        "tiny",
        model_id=random_tiny_model,
        run_dir=str(tmp_path / "run"),
        block_size=1024,
        max_example_tokens=1024,
        micro_batch_size=1,
        max_steps=8,
        eval_every=4,
        checkpoint_every=4,
        max_eval_batches=4,
    )


BASE = str(TINY_BASE_DIR)  # trained weights: its attention matters, so a leak or a wrong mask would show


def finished_default_chain(config: Config) -> Path | None:
    """`runs/tiny` when README command 1 has just made it with this very code, these packages and `config`'s
    settings (its chain record says so); None otherwise."""
    from htmlgen_utils.pipeline import CHAIN_RECORD, code_fingerprint

    finished = REPO_DIR / "runs" / "tiny"
    record = finished / CHAIN_RECORD
    if not record.exists() or not (finished / "metrics.json").exists():
        return None
    made_by = json.loads(record.read_text())
    asked = {"preset": config.preset, "dataset": config.dataset, "overrides": {}}
    return finished if made_by == {"code": code_fingerprint(), "parameters": asked} else None


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The whole tiny chain: papermill executes notebooks 01-05 once (test_pipeline, test_export use it).

    The chain is deterministic for the same code, packages and settings, so where README command 1 has just run it
    (CI runs the README's commands in order) that run is copied, with its paths rewritten, instead of run again."""
    from htmlgen_utils.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("chain") / "tiny"
    config = Config.from_preset("tiny", run_dir=str(run_dir))
    finished = finished_default_chain(config)
    if finished is None:
        return run_dir, run_pipeline(config)
    shutil.copytree(finished, run_dir)
    for file in run_dir.rglob("*"):
        if file.suffix in (".json", ".ipynb", ".md") and file.is_file():
            text = file.read_text(encoding="utf-8")
            if str(finished) in text:
                file.write_text(text.replace(str(finished), str(run_dir)), encoding="utf-8")
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def packed_batch(bundled_rows):
    """Two packed blocks of several examples each (pages cut to 300 tokens; position ids restart per example)."""
    import datasets

    from htmlgen_utils.levers import example_spans
    from htmlgen_utils.model import load_tokenizer
    from htmlgen_utils.packing import make_dataloader, pack_splits

    config = Config.from_preset("tiny", block_size=1024, max_example_tokens=300, run_dir="unused")
    rows = [{"label": r["label"], "html": r["html"]} for r in bundled_rows[:40]]
    splits = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name in ("train", "validation", "test")})
    packed, _ = pack_splits(splits, load_tokenizer(BASE), config)
    batch = next(iter(make_dataloader(packed["train"], 2)))
    assert all(len(spans) >= 4 for spans in example_spans(batch["position_ids"]))  # 3+ examples, then padding
    return batch


@pytest.fixture
def training_model(tiny_config):
    """The 4-bit tiny Llama with LoRA, checkpointing on and dropout off, so two passes are comparable."""
    from htmlgen_utils.model import load_for_training

    config = tiny_config.replace(model_id=BASE, gradient_checkpointing=True, lora_dropout=0.0)
    model, _ = load_for_training(config)
    model.train()
    return model


def _tree_state(folder):
    return sorted((str(path), path.stat().st_mtime_ns) for path in folder.rglob("*")) if folder.exists() else None


@pytest.fixture(scope="session", autouse=True)
def users_runs_untouched():
    """The suite is hermetic: no test writes into the repository's `runs/`, where a user's own runs live (README
    command 1 leaves one there). The one read, the `chain` fixture's, takes `runs/tiny` only when its chain
    record proves it is the very chain the fixture would run."""
    from htmlgen_utils.config import REPO_DIR

    before = _tree_state(REPO_DIR / "runs")
    yield
    assert _tree_state(REPO_DIR / "runs") == before, "a test wrote into the repository's runs/: give it a tmp run_dir"
