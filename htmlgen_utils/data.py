"""Stage 1: load description -> page pairs, validate them, drop duplicates, and split.

Sources: the bundled dataset (`"bundled"`), a local `.json` / `.jsonl` / `.csv` file, or a hub id
(for example `jawerty/html_dataset` on Colab). Every source ends as a `datasets.DatasetDict` with
two string columns, `label` and `html`, and `train` / `validation` / `test` splits: the test split
is held out for the final evaluation and never used for validation during training.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from .config import BUNDLED_DATA_FILE, BUNDLED_DATASET, Config

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class DataReport:
    """What loading did to the rows, so notebooks can show it and nothing is dropped silently."""

    source: str
    rows_loaded: int
    empty_dropped: int
    duplicates_dropped: int
    rows_kept: int
    train: int = 0
    validation: int = 0
    test: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _read_bundled() -> list[dict]:
    if BUNDLED_DATA_FILE.exists():
        with open(BUNDLED_DATA_FILE, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    # Installed without the repository's data/ folder (e.g. pip install from git): the generator is
    # deterministic, so regenerating gives the very same rows.
    from .dataset_generator import generate_dataset

    return generate_dataset()


def load_raw(source: str) -> datasets.Dataset:
    """Read `source` into a Dataset without validating it yet."""
    if source == BUNDLED_DATASET:
        return datasets.Dataset.from_list(_read_bundled())
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"Dataset file {path} does not exist: check the --dataset path")
        try:
            return datasets.load_dataset(LOCAL_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as error:  # arrow/json errors are cryptic; name the file and the usual fixes
            raise ValueError(
                f"Could not read {path} as {path.suffix} ({type(error).__name__}: {error}). Expected a JSON list of "
                f"objects, one JSON object per line, or a CSV with a header row; every value of a column must have "
                f"the same type (strings)."
            ) from error
    if path.exists():
        raise ValueError(f"Unsupported dataset file {path}: use .json, .jsonl or .csv")
    # A hub id such as "jawerty/html_dataset" (needs network access; Colab has it).
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as error:
        raise ValueError(
            f"Could not load dataset {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Check the id and your network, or pass a local .json/.jsonl/.csv file, or 'bundled'."
        ) from error


def validate_and_clean(raw: datasets.Dataset, label_column: str = "label", html_column: str = "html",
                       source: str = "") -> tuple[datasets.Dataset, DataReport]:
    """Check columns and types, normalise text, drop empty rows and exact duplicates."""
    missing = [c for c in (label_column, html_column) if c not in raw.column_names]
    if missing:
        raise ValueError(
            f"Dataset {source!r} has no column(s) {missing}; it has {raw.column_names}. "
            f"Set label_column / html_column (e.g. -p label_column title) to the right names."
        )
    if len(raw) == 0:
        raise ValueError(f"Dataset {source!r} has zero rows: nothing to train on")
    rows, empty, seen, duplicates = [], 0, set(), 0
    for index, (label, html) in enumerate(zip(raw[label_column], raw[html_column])):
        for column, value in ((label_column, label), (html_column, html)):
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"Row {index} of {source!r}: column {column!r} holds {type(value).__name__} {value!r:.60}, "
                    f"expected text. Fix the row or convert the column to strings."
                )
        label = " ".join((label or "").split())  # one line, single spaces
        html = (html or "").replace("\r\n", "\n").replace("\r", "\n").strip()
        if not label or not html:
            empty += 1
            continue
        key = (label, html)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append({"label": label, "html": html})
    if not rows:
        raise ValueError(f"Dataset {source!r}: all {len(raw)} rows have an empty description or page")
    report = DataReport(source=source, rows_loaded=len(raw), empty_dropped=empty,
                        duplicates_dropped=duplicates, rows_kept=len(rows))
    return datasets.Dataset.from_list(rows), report


def split_dataset(dataset: datasets.Dataset, validation_fraction: float, test_fraction: float,
                  seed: int) -> datasets.DatasetDict:
    """Deterministic train / validation / test split (same seed, same rows in each split)."""
    n = len(dataset)
    if n < 3:
        raise ValueError(f"Need at least 3 distinct rows to make train/validation/test splits, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * validation_fraction))
    if n - n_test - n_val < 1:
        n_test, n_val = 1, 1
    return datasets.DatasetDict({
        "test": dataset.select(order[:n_test]),
        "validation": dataset.select(order[n_test:n_test + n_val]),
        "train": dataset.select(order[n_test + n_val:]),
    })


def load_splits(config: Config) -> tuple[datasets.DatasetDict, DataReport]:
    """Load, validate, dedupe and split the dataset that `config` names."""
    raw = load_raw(config.dataset)
    clean, report = validate_and_clean(raw, config.label_column, config.html_column, config.dataset)
    splits = split_dataset(clean, config.validation_fraction, config.test_fraction, config.seed)
    report.train, report.validation, report.test = (len(splits[s]) for s in ("train", "validation", "test"))
    return splits, report


def save_splits(splits: datasets.DatasetDict, report: DataReport, run_dir: str | Path) -> Path:
    """Write the splits as JSONL (readable, diffable) plus the report into `run_dir/data`."""
    out = Path(run_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.to_json(str(out / f"{name}.jsonl"), lines=True, force_ascii=False)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return out


def load_saved_splits(run_dir: str | Path) -> datasets.DatasetDict:
    """The splits notebook 01 saved; a clear message if it has not run yet."""
    folder = Path(run_dir) / "data"
    files = {name: folder / f"{name}.jsonl" for name in ("train", "validation", "test")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Missing {missing}: run notebook 01_dataset_exploration first (same run_dir)")
    return datasets.DatasetDict({
        # split on "\n" only: str.splitlines() also splits on U+2028, U+0085, form feed... inside a page
        name: datasets.Dataset.from_list([json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")
                                          if line.strip()])
        for name, path in files.items()
    })
