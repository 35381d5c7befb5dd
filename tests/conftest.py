"""Shared fixtures: the bundled rows, a small random-init tiny Llama built locally, and configs for it."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from htmlgen_utils.config import BUNDLED_DATA_FILE, Config  # noqa: E402


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
    return Config.from_preset("tiny", model_id=random_tiny_model, run_dir=str(tmp_path / "run"), block_size=1024,
                              max_example_tokens=1024, micro_batch_size=1, max_steps=8, eval_every=4,
                              checkpoint_every=4, max_eval_batches=4)
