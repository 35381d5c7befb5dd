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
    body = "".join(
        f"<div class='c{seed}'><p>Item {i} of a long scraped page, {seed}.</p></div>\n" for i in range(paragraphs)
    )
    return f"<!DOCTYPE html><html><head><title>Page {seed}</title></head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def scraped_file(tmp_path_factory):
    rows = [{"label": f"A long news site number {i}", "html": _long_page(i, 3000 + 500 * i)} for i in range(4)]
    rows += [
        {"label": "An empty page", "html": ""},
        {"label": "", "html": "<p>no label</p>"},
        {"label": "Almost nothing", "html": "<p>"},
        {"label": "A tiny page", "html": "<b>hi</b>"},
    ]
    rows += [rows[0], rows[1], rows[7]]  # exact duplicates
    rows += [{"label": f"Short page {i}", "html": f"<html><body><h1>{i}</h1></body></html>"} for i in range(10)]
    path = tmp_path_factory.mktemp("scraped") / "pages.json"
    path.write_text(json.dumps(rows))
    assert max(len(r["html"]) for r in rows) > 200_000
    return path


def test_load_split_pack_reports_the_policy(scraped_file):
    config = Config.from_preset("tiny", dataset=str(scraped_file))
    splits, report = load_splits(config)
    assert (report.rows_loaded, report.empty_dropped, report.duplicates_dropped) == (21, 2, 3)
    packed, stats = pack_splits(splits, load_tokenizer(config.model_id), config)
    total = {
        k: sum(getattr(s, k) for s in stats.values()) for k in ("truncated", "kept", "dropped", "tokens_cut_by_policy")
    }
    # the two fragments (`<p>`, `<b>hi</b>`) are no page and were dropped, counted: 10 short pages kept whole
    assert report.unteachable_dropped == {"not a page": 2, "empty render": 1} and report.rows_kept == 14
    assert total["truncated"] == 4 and total["kept"] == 10 and total["tokens_cut_by_policy"] > 100_000
    for split in packed.values():
        assert all(len(ids) == config.block_size for ids in split["input_ids"])
    dropped = pack_splits(splits, load_tokenizer(config.model_id), config.replace(long_page_policy="drop"))[1]
    assert sum(s.dropped for s in dropped.values()) == 4


MESSY_TEXT = [
    "line\u2028separator",
    "para\u2029graph",
    "next\u0085line",
    "form\x0cfeed",
    "windows\r\nline\r\nends",
    "nul\x00byte",
    "emoji 🎉🧪 and ZWJ 👩‍💻",
    "Ελληνικά, русский, 中文, العربية, हिन्दी",
    "bom\ufeffinside",
    "old mac\rline",
]


def _messy_rows() -> list[dict]:
    rows = []
    for i, text in enumerate(MESSY_TEXT * 2):
        page = (
            f"<!DOCTYPE html><html><head><title>{i}</title></head><body><p>{text}</p>"
            f"<p>{'x' * (i % 3)}</p></body></html>"
        )
        rows.append({"label": f"A page with {text} number {i}", "html": page})
    long_line = "<!DOCTYPE html><html><head></head><body>" + "<span>one long line</span>" * 20_000 + "</body></html>"
    rows.append({"label": "A page that is one 500k-character line", "html": long_line})
    return rows


@pytest.fixture(scope="module")
def messy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("messy") / "messy.jsonl"
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in _messy_rows())
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # a byte-order mark, as Windows editors write
    return path


def test_messy_text_comes_back_byte_identical_from_the_saved_splits(messy_file, tmp_path):
    from htmlgen_utils.data import load_raw, load_saved_splits, save_splits, validate_and_clean

    config = Config.from_preset("tiny", dataset=str(messy_file), run_dir=str(tmp_path / "run"))
    clean, _ = validate_and_clean(load_raw(str(messy_file)), source="messy")
    splits, report = load_splits(config)
    assert report.rows_kept == len(_messy_rows())
    save_splits(splits, report, config.run_dir)
    saved = load_saved_splits(config.run_dir)
    assert sorted(zip(clean["label"], clean["html"])) == sorted(
        pair for name in saved for pair in zip(saved[name]["label"], saved[name]["html"])
    )
    pages = {page for name in saved for page in saved[name]["html"]}
    for text in MESSY_TEXT:  # inside pages nothing is normalised but line ends (\r\n and \r become \n)
        assert any(text.replace("\r\n", "\n").replace("\r", "\n") in page for page in pages), repr(text)


def test_csv_keeps_newlines_inside_quoted_fields(tmp_path):
    import csv

    path = tmp_path / "pages.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "html"])
        writer.writeheader()
        writer.writerows(_messy_rows())
    splits, report = load_splits(Config.from_preset("tiny", dataset=str(path)))
    assert report.rows_kept == len(_messy_rows())
    assert any("line\u2028separator" in page for name in splits for page in splits[name]["html"])


def test_the_chain_runs_on_scraped_and_messy_pages_and_loses_nothing(scraped_file, tmp_path):
    """One headless chain over both kinds of real-world data (one chain: each costs a minute): 200k-character pages,
    empty rows and duplicates beside Unicode separators, NUL bytes and a byte-order mark. It finishes with every
    score, and the evaluation table's references are the test split's pages byte for byte."""
    rows = json.loads(scraped_file.read_text()) + _messy_rows()
    path = tmp_path / "pages.jsonl"
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    run_dir = tmp_path / "run"
    settings = ["max_steps", "2", "max_new_tokens", "32", "test_fraction", "0.2"]
    command = [sys.executable, "-m", "htmlgen_utils.pipeline", "--preset", "tiny", "--dataset", str(path)]
    command += ["--run-dir", str(run_dir)] + [
        part for pair in zip(["-p"] * 3, settings[::2], settings[1::2]) for part in pair
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"rouge1", "rougeL", "html_valid_rate", "eval_loss", "token_accuracy"} <= set(metrics)
    from htmlgen_utils.data import load_saved_splits

    test_pages = list(load_saved_splits(run_dir)["test"]["html"])
    table = json.loads((run_dir / "eval_table.json").read_text(encoding="utf-8"))
    assert len(table) >= 5 and [row["reference"] for row in table] == test_pages[: len(table)]
    assert any(len(page) > 100_000 for page in test_pages + list(load_saved_splits(run_dir)["train"]["html"]))
