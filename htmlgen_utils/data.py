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

from .config import BUNDLED_DATA_FILE, BUNDLED_DATASET, BUNDLED_LONG_DATASET, BUNDLED_LONG_FILE, Config

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class DatasetProfile:
    """A public corpus by one word: where it lives on the hub and which columns hold the description and the page."""

    hub_id: str
    config_name: str | None
    label_column: str
    html_column: str
    licence: str
    about: str
    max_rows: int = 5000  # streamed from the hub, never downloaded whole


DATASET_PROFILES = {
    "websight-described": DatasetProfile(
        "HuggingFaceM4/WebSight", "v0.1", "llm_generated_idea", "text", "CC BY 4.0",
        "synthetic pages (Tailwind CSS) with the natural-language website idea each was written from"),
    "jawerty-html": DatasetProfile(
        "jawerty/html_dataset", None, "label", "html", "none stated on its card: check before redistributing",
        "43 scraped real-world pages with short descriptions (long pages: see the long-page policy)"),
}


def rows_from_profile(profile: DatasetProfile, source: str | None = None, encoding: str = "utf-8") -> list[dict]:
    """A profile's rows as {"label", "html"}: streamed from the hub (its first `max_rows`), or read from a local
    file with the same columns (`source`)."""
    if source is not None:
        rows = _read_rows(Path(source), encoding)
    else:
        try:
            stream = datasets.load_dataset(profile.hub_id, profile.config_name, split="train", streaming=True)
            rows = [dict(row) for _, row in zip(range(profile.max_rows), stream)]
        except Exception as error:
            raise ValueError(f"Could not stream {profile.hub_id} from the Hugging Face hub ({type(error).__name__}: "
                             f"{error}). It needs the network (Colab has it).") from None
    missing = [c for c in (profile.label_column, profile.html_column) if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{profile.hub_id} rows have no column(s) {missing}; it has {list(rows[0])}")
    return [{"label": row[profile.label_column], "html": row[profile.html_column]} for row in rows]


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


def _read_bundled(long: bool = False) -> list[dict]:
    path = BUNDLED_LONG_FILE if long else BUNDLED_DATA_FILE
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")  # "\n" only, never U+2028 or "\r"
        return [json.loads(line) for line in lines if line.strip()]
    # Installed without the repository's data/ folder (e.g. pip install from git): the generator is
    # deterministic, so regenerating gives the very same rows.
    from .dataset_generator import generate_dataset, generate_long_dataset

    return generate_long_dataset() if long else generate_dataset()


def _decode(path: Path, encoding: str) -> str:
    """The file's text; a byte-order mark at the start is dropped. A file that is not in `encoding` is named with
    the first bad byte and the two ways out."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"Dataset file {path} is empty: nothing to train on")
    try:
        return data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"Dataset file {path} is not {encoding} text (byte 0x{data[error.start]:02x} on line {line}). "
                         f"Give its encoding, e.g. -p dataset_encoding latin-1 (in a notebook: overrides="
                         f"{{\"dataset_encoding\": \"latin-1\"}}), or convert it: iconv -f latin1 -t utf-8") from None
    except LookupError:
        raise ValueError(f"dataset_encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, "
                         f"cp1252)") from None


def _read_rows(path: Path, encoding: str) -> list[dict]:
    """Rows of a local .json (a list of objects), .jsonl (one object a line) or .csv (a header row) file, with a
    message that names the line for anything else."""
    text = _decode(path, encoding)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv
        import io

        csv.field_size_limit(2**31 - 1)  # scraped pages run to hundreds of thousands of characters
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields keep their newlines and CRs
        try:
            rows = list(reader)
        except csv.Error as error:
            raise ValueError(f"Dataset file {path}, line {reader.line_num}: not valid CSV ({error})") from None
        if not rows:
            raise ValueError(f"Dataset file {path} has a header row and no data rows")
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            hint = " (one object per line is .jsonl: rename the file)" if "Extra data" in error.msg else ""
            raise ValueError(f"Dataset file {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                             f"{error.colno}{hint}") from None
        if isinstance(data, dict):
            lists = [key for key, value in data.items() if isinstance(value, list)]
            where = f" (its key {lists[0]!r} holds a list: save that list alone)" if lists else ""
            raise ValueError(f"Dataset file {path} holds a JSON object; expected a list of objects "
                             f"[{{\"label\": ..., \"html\": ...}}, ...]{where}")
        rows = data if isinstance(data, list) else None
    else:
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # "\n" only: U+2028 and friends stay inside a page
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"Dataset file {path}, line {number}: not a JSON object ({error.msg} at column "
                                 f"{error.colno}). Each line must be one object like {{\"label\": ..., "
                                 f"\"html\": ...}}") from None
    bad = next((i for i, row in enumerate(rows or [None]) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"Dataset file {path}: entry {bad + 1} is {type((rows or [None])[bad]).__name__}, expected an "
                         f"object with a description and a page, e.g. {{\"label\": ..., \"html\": ...}}")
    return rows


def load_raw(source: str, encoding: str = "utf-8") -> datasets.Dataset | list[dict]:
    """Read `source` without validating it yet: the bundled rows, a local file's rows, or a hub dataset."""
    if source in (BUNDLED_DATASET, BUNDLED_LONG_DATASET):
        return _read_bundled(long=source == BUNDLED_LONG_DATASET)
    if source in DATASET_PROFILES:
        return rows_from_profile(DATASET_PROFILES[source])
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"Dataset file {path} does not exist: check the --dataset path (or the dataset "
                                    f"parameter)")
        if path.is_dir() or path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"Unsupported dataset file {path}: give a .json, .jsonl or .csv file")
        return _read_rows(path, encoding)
    # A hub id such as "jawerty/html_dataset" (needs network access; Colab has it).
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as error:
        raise ValueError(
            f"Could not load dataset {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Check the id and your network, or pass a local .json/.jsonl/.csv file, or 'bundled'."
        ) from None


def validate_and_clean(raw: datasets.Dataset | list[dict], label_column: str = "label", html_column: str = "html",
                       source: str = "") -> tuple[datasets.Dataset, DataReport]:
    """Check columns and types, normalise text, drop empty rows and exact duplicates."""
    if isinstance(raw, list):
        columns = list(dict.fromkeys(key for row in raw[:1000] for key in row))
        labels = [row.get(label_column) for row in raw]
        pages = [row.get(html_column) for row in raw]
    else:
        columns = raw.column_names
        labels = raw[label_column] if label_column in columns else []
        pages = raw[html_column] if html_column in columns else []
    missing = [c for c in (label_column, html_column) if c not in columns]
    if missing:
        raise ValueError(
            f"Dataset {source!r} has no column(s) {missing}; it has {columns}. "
            f"Set label_column / html_column (e.g. -p label_column title) to the right names."
        )
    if len(raw) == 0:
        raise ValueError(f"Dataset {source!r} has zero rows: nothing to train on")
    rows, empty, seen, duplicates = [], 0, set(), 0
    for index, (label, html) in enumerate(zip(labels, pages)):
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
    raw = load_raw(config.dataset, config.dataset_encoding)
    columns = ("label", "html") if config.dataset in DATASET_PROFILES else (config.label_column, config.html_column)
    clean, report = validate_and_clean(raw, *columns, config.dataset)
    if len(clean) < 3:
        raise ValueError(f"Dataset {config.dataset!r}: {report.rows_loaded} rows, {report.empty_dropped} empty and "
                         f"{report.duplicates_dropped} duplicates dropped, {len(clean)} distinct left; train, "
                         f"validation and test need at least 3 (better hundreds)")
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
