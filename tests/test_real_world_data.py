"""Scraped-web-like data: 200k-character pages, empty pages, duplicates, near-empty rows."""
import json
import subprocess
import sys

import pytest

from htmlgen_utils.config import REPO_DIR, Config
from htmlgen_utils.data import load_splits
from htmlgen_utils.model import load_tokenizer
from htmlgen_utils.packing import pack_splits


def _long_page(seed: int, paragraphs: int) -> str:
    body = "".join(f"<div class='c{seed}'><p>Item {i} of a long scraped page, {seed}.</p></div>\n" for i in range(paragraphs))
    return f"<!DOCTYPE html><html><head><title>Page {seed}</title></head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def scraped_file(tmp_path_factory):
    rows = [{"label": f"A long news site number {i}", "html": _long_page(i, 3000 + 500 * i)} for i in range(4)]
    rows += [{"label": "An empty page", "html": ""}, {"label": "", "html": "<p>no label</p>"},
             {"label": "Almost nothing", "html": "<p>"}, {"label": "A tiny page", "html": "<b>hi</b>"}]
    rows += [rows[0], rows[1], rows[7]]  # exact duplicates
    rows += [{"label": f"Short page {i}", "html": f"<html><body><h1>{i}</h1></body></html>"} for i in range(6)]
    path = tmp_path_factory.mktemp("scraped") / "pages.json"
    path.write_text(json.dumps(rows))
    assert max(len(r["html"]) for r in rows) > 200_000
    return path


def test_load_split_pack_reports_the_policy(scraped_file):
    config = Config.from_preset("tiny", dataset=str(scraped_file))
    splits, report = load_splits(config)
    assert (report.rows_loaded, report.empty_dropped, report.duplicates_dropped) == (17, 2, 3)
    packed, stats = pack_splits(splits, load_tokenizer(config.model_id), config)
    total = {k: sum(getattr(s, k) for s in stats.values()) for k in ("truncated", "kept", "dropped", "tokens_cut_by_policy")}
    assert total["truncated"] == 4 and total["kept"] == 8 and total["tokens_cut_by_policy"] > 100_000
    for split in packed.values():
        assert all(len(ids) == config.block_size for ids in split["input_ids"])
    dropped = pack_splits(splits, load_tokenizer(config.model_id), config.replace(long_page_policy="drop"))[1]
    assert sum(s.dropped for s in dropped.values()) == 4


def test_pipeline_runs_on_scraped_pages(scraped_file, tmp_path):
    result = subprocess.run([sys.executable, "-m", "htmlgen_utils.pipeline", "--preset", "tiny", "--dataset",
                             str(scraped_file), "--run-dir", str(tmp_path / "run"), "-p", "max_steps", "2",
                             "-p", "max_new_tokens", "64"], capture_output=True, text=True, cwd=REPO_DIR, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"rouge1", "rougeL", "html_valid_rate", "eval_loss", "token_accuracy"} <= set(metrics)
