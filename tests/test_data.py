import json

import datasets
import pytest

from htmlgen_utils.config import Config
from htmlgen_utils.data import load_splits, split_dataset, validate_and_clean


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


ROWS = [{"title": f"page {i}", "code": f"<!DOCTYPE html><html><head></head><body>{i}</body></html>"} for i in range(30)]


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
def test_local_files_with_custom_columns(tmp_path, kind):
    path = tmp_path / f"pages.{kind}"
    _write(path, ROWS, kind)
    config = Config.from_preset("tiny", dataset=str(path), label_column="title", html_column="code")
    splits, report = load_splits(config)
    assert report.rows_kept == 30 and report.duplicates_dropped == 0
    assert sum(len(s) for s in splits.values()) == 30
    assert set(splits["train"].column_names) == {"label", "html"}


def test_bundled_split_is_deterministic_and_disjoint():
    config = Config.from_preset("tiny")
    a, report = load_splits(config)
    b, _ = load_splits(config)
    assert report.rows_kept >= 1000
    for name in ("train", "validation", "test"):
        assert a[name]["label"] == b[name]["label"]
    keys = {name: set(zip(a[name]["label"], a[name]["html"])) for name in a}
    assert not keys["test"] & keys["validation"] and not keys["test"] & keys["train"]
    assert not keys["validation"] & keys["train"]
    c, _ = load_splits(config.replace(seed=7))
    assert c["test"]["label"] != a["test"]["label"]


def test_missing_columns_named(tmp_path):
    path = tmp_path / "x.jsonl"
    _write(path, [{"prompt": "a", "page": "b"}] * 3, "jsonl")
    with pytest.raises(ValueError, match=r"no column\(s\) \['label', 'html'\].*label_column"):
        load_splits(Config.from_preset("tiny", dataset=str(path)))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(Config.from_preset("tiny", dataset=str(tmp_path / "missing.json")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_splits(Config.from_preset("tiny", dataset=str(tmp_path / "empty.jsonl")))
    with pytest.raises(ValueError, match="zero rows"):
        validate_and_clean(datasets.Dataset.from_dict({"label": [], "html": []}), source="x")
    with pytest.raises(ValueError, match=r"Row 0 of 'x': column 'html' holds int"):
        validate_and_clean(datasets.Dataset.from_dict({"label": ["a", "b"], "html": [1, 2]}), source="x")
    with pytest.raises(ValueError, match="all 2 rows have an empty"):
        validate_and_clean(datasets.Dataset.from_list([{"label": " ", "html": "x"}, {"label": "a", "html": ""}]))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="Unsupported dataset file"):
        load_splits(Config.from_preset("tiny", dataset=str(tmp_path / "x.txt")))


def test_normalise_drop_empty_and_duplicates():
    raw = datasets.Dataset.from_list(
        [
            {"label": "  A   page ", "html": "<p>x</p>\r\n"},
            {"label": "A page", "html": "<p>x</p>"},
            {"label": "", "html": "<p>y</p>"},
            {"label": "B", "html": None},
            {"label": "C", "html": "<b>c</b>"},
        ]
    )
    clean, report = validate_and_clean(raw)
    assert clean["label"] == ["A page", "C"]
    assert (report.empty_dropped, report.duplicates_dropped, report.rows_kept) == (2, 1, 2)


def test_split_sizes_small_data():
    ds = datasets.Dataset.from_dict({"label": list("abcde"), "html": list("vwxyz")})
    splits = split_dataset(ds, 0.05, 0.05, seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (3, 1, 1)
    with pytest.raises(ValueError, match="at least 3"):
        split_dataset(ds.select([0, 1]), 0.05, 0.05, 0)


def test_named_profiles_map_the_public_corpora_columns(tmp_path):
    """The profiles need the network; their column mapping is checked on local files with the corpora's columns."""
    from htmlgen_utils.data import DATASET_PROFILES, rows_from_profile

    websight = DATASET_PROFILES["websight-described"]
    assert (websight.hub_id, websight.label_column, websight.html_column) == (
        "HuggingFaceM4/WebSight",
        "llm_generated_idea",
        "text",
    )
    path = tmp_path / "websight.jsonl"
    _write(
        path,
        [
            {"image": None, "text": f"<html><body>{i}</body></html>", "llm_generated_idea": f"A bakery site {i}"}
            for i in range(3)
        ],
        "jsonl",
    )
    rows = rows_from_profile(websight, source=str(path))
    assert rows[0] == {"label": "A bakery site 0", "html": "<html><body>0</body></html>"} and len(rows) == 3
    jawerty = tmp_path / "jawerty.json"
    _write(jawerty, [{"label": "a page", "html": "<p>x</p>"}], "json")
    assert rows_from_profile(DATASET_PROFILES["jawerty-html"], source=str(jawerty)) == [
        {"label": "a page", "html": "<p>x</p>"}
    ]
    with pytest.raises(ValueError, match=r"no column\(s\) \['llm_generated_idea', 'text'\]"):
        rows_from_profile(websight, source=str(jawerty))
