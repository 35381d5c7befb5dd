"""Stage 1: load description -> page pairs, validate them, drop duplicates, and split.

Sources: the bundled dataset (`"bundled"`), a local `.json` / `.jsonl` / `.csv` file, or a hub id
(for example `jawerty/html_dataset` on Colab). Every source ends as a `datasets.DatasetDict` with
two string columns, `label` and `html`, and `train` / `validation` / `test` splits: the test split
is held out for the final evaluation and never used for validation during training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from .cleaning import triage_and_clean
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
        "HuggingFaceM4/WebSight",
        "v0.1",
        "llm_generated_idea",
        "text",
        "CC BY 4.0",
        "synthetic pages (Tailwind CSS) with the natural-language website idea each was written from",
    ),
    "jawerty-html": DatasetProfile(
        "jawerty/html_dataset",
        None,
        "label",
        "html",
        "none stated on its card: check before redistributing",
        "43 scraped real-world pages with short descriptions (long pages: see the long-page policy)",
    ),
}


def rows_from_profile(profile: DatasetProfile, source: str | None = None, encoding: str = "utf-8") -> list[dict]:
    """A profile's rows as {"label", "html"}: streamed from the hub (its first `max_rows`), or read from a local
    file with the same columns (`source`)."""
    if source is not None:
        rows = list(FileRows(Path(source), encoding))
    else:
        try:
            stream = datasets.load_dataset(profile.hub_id, profile.config_name, split="train", streaming=True)
            rows = [dict(row) for _, row in zip(range(profile.max_rows), stream)]
        except Exception as error:
            raise ValueError(
                f"Could not stream {profile.hub_id} from the Hugging Face hub ({type(error).__name__}: "
                f"{error}). It needs the network (Colab has it)."
            ) from None
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
    flagged: dict = field(default_factory=dict)  # rows flagged by triage, by reason (cleaning.triage)
    unteachable_dropped: dict = field(default_factory=dict)  # of those, dropped (`drop_unteachable`), by reason
    page_cleaning: str = "none"
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


def _codec(encoding: str) -> str:
    """The codec to read `encoding` with: UTF-8 drops a byte-order mark at the start of the file."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _not_text(path: Path, encoding: str, byte: int, line: int) -> ValueError:
    return ValueError(
        f"Dataset file {path} is not {encoding} text (byte 0x{byte:02x} on line {line}). Give its "
        f"encoding, e.g. -p dataset_encoding latin-1 (in a notebook: overrides="
        f'{{"dataset_encoding": "latin-1"}}), or convert it: iconv -f latin1 -t utf-8'
    )


def _decode(path: Path, encoding: str) -> str:
    """The file's text, whole (a .json array, or an encoding whose newline is not the byte 0x0a); a byte-order
    mark at the start is dropped. A file that is not in `encoding` is named with the first bad byte."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"Dataset file {path} is empty: nothing to train on")
    try:
        return data.decode(_codec(encoding))
    except UnicodeDecodeError as error:
        raise _not_text(path, encoding, data[error.start], data[: error.start].count(b"\n") + 1) from None


def _check_encoding(encoding: str) -> None:
    try:
        "".encode(encoding)
    except LookupError:
        raise ValueError(
            f"dataset_encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, cp1252)"
        ) from None


def _jsonl_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, read one at a time; lines end at "\n" only, never at U+2028 or "\r"."""
    if "\n".encode(encoding) != b"\n":  # e.g. UTF-16: lines cannot be cut from the bytes
        yield from enumerate(_decode(path, encoding).split("\n"), 1)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):  # a binary file's lines end at b"\n" only
            try:
                yield number, raw.decode(_codec(encoding) if number == 1 else encoding)
            except UnicodeDecodeError as error:
                raise _not_text(path, encoding, raw[error.start], number) from None


def _jsonl_rows(path: Path, encoding: str) -> Iterator[dict]:
    for number, line in _jsonl_lines(path, encoding):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Dataset file {path}, line {number}: not a JSON object ({error.msg} at column "
                f'{error.colno}). Each line must be one object like {{"label": ..., '
                f'"html": ...}}'
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"Dataset file {path}: entry {number} is {type(row).__name__}, expected an object with "
                f'a description and a page, e.g. {{"label": ..., "html": ...}}'
            )
        yield row


def _csv_rows(path: Path, encoding: str) -> Iterator[dict]:
    import csv

    csv.field_size_limit(2**31 - 1)  # scraped pages run to hundreds of thousands of characters
    with open(path, encoding=_codec(encoding), newline="") as handle:  # quoted fields keep newlines and CRs
        reader = csv.DictReader(handle)
        try:
            yield from reader
        except csv.Error as error:
            raise ValueError(f"Dataset file {path}, line {reader.line_num}: not valid CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise _not_text(path, encoding, error.object[error.start], reader.line_num + 1) from None
        if reader.line_num == 1:
            raise ValueError(f"Dataset file {path} has a header row and no data rows")


def _json_rows(path: Path, encoding: str) -> list[dict]:
    """A .json file is one array: read whole (for a large corpus, .jsonl streams)."""
    try:
        data = json.loads(_decode(path, encoding))
    except json.JSONDecodeError as error:
        hint = " (one object per line is .jsonl: rename the file)" if "Extra data" in error.msg else ""
        raise ValueError(
            f"Dataset file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}{hint}"
        ) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        where = f" (its key {lists[0]!r} holds a list: save that list alone)" if lists else ""
        raise ValueError(
            f"Dataset file {path} holds a JSON object; expected a list of objects "
            f'[{{"label": ..., "html": ...}}, ...]{where}'
        )
    bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(
            f"Dataset file {path}: entry {bad + 1} is {type(data[bad]).__name__}, expected an object "
            f'with a description and a page, e.g. {{"label": ..., "html": ...}}'
        )
    return data


class FileRows:
    """The rows of a local .json (a list of objects), .jsonl (one object a line) or .csv (a header row) file, read
    as they are iterated: a .jsonl or .csv file is never in memory whole. Problems name the line."""

    def __init__(self, path: Path, encoding: str):
        _check_encoding(encoding)
        self.path, self.encoding = path, encoding
        if path.stat().st_size == 0:
            raise ValueError(f"Dataset file {path} is empty: nothing to train on")

    def __iter__(self) -> Iterator[dict]:
        suffix = self.path.suffix.lower()
        reader = {".csv": _csv_rows, ".json": _json_rows}.get(suffix, _jsonl_rows)
        empty = True
        for row in reader(self.path, self.encoding):
            empty = False
            yield row
        if empty:
            raise ValueError(f"Dataset file {self.path} is empty: nothing to train on")


def load_raw(source: str, encoding: str = "utf-8") -> datasets.Dataset | Iterable[dict]:
    """Read `source` without validating it yet: the bundled rows, a local file's rows (read as they are
    iterated), or a hub dataset."""
    if source in (BUNDLED_DATASET, BUNDLED_LONG_DATASET):
        return _read_bundled(long=source == BUNDLED_LONG_DATASET)
    if source in DATASET_PROFILES:
        return rows_from_profile(DATASET_PROFILES[source])
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"Dataset file {path} does not exist: check the --dataset path (or the dataset parameter)"
            )
        if path.is_dir() or path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"Unsupported dataset file {path}: give a .json, .jsonl or .csv file")
        return FileRows(path, encoding)
    # A hub id such as "jawerty/html_dataset" (needs network access; Colab has it).
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as error:
        raise ValueError(
            f"Could not load dataset {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Check the id and your network, or pass a local .json/.jsonl/.csv file, or 'bundled'."
        ) from None


def arrow_dataset(rows: Iterable[dict], features: datasets.Features) -> datasets.Dataset:
    """A `datasets.Dataset` of `rows`, written to an Arrow file on disk as they come (in batches) and
    memory-mapped: a corpus of any size never sits in Python lists. Each call writes a file of its own in a fresh
    temporary folder, so nothing stale is ever read back from a cache."""
    import tempfile

    from datasets.arrow_writer import ArrowWriter

    path = Path(tempfile.mkdtemp(prefix="htmlgen-")) / "rows.arrow"
    with ArrowWriter(features=features, path=str(path), writer_batch_size=1000) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


PAIR_FEATURES = datasets.Features({"label": datasets.Value("string"), "html": datasets.Value("string")})


def validate_and_clean(
    raw: datasets.Dataset | Iterable[dict], label_column: str = "label", html_column: str = "html", source: str = ""
) -> tuple[datasets.Dataset, DataReport]:
    """Check columns and types, normalise text, drop empty rows and exact duplicates, in one pass over the rows
    (duplicates are found by a hash of each pair, so only the hashes are held in memory)."""
    import hashlib
    import itertools

    rows = iter(raw)
    first = list(itertools.islice(rows, 1000))
    columns = (
        raw.column_names
        if isinstance(raw, datasets.Dataset)
        else list(dict.fromkeys(key for row in first for key in row))
    )
    missing = [c for c in (label_column, html_column) if c not in columns]
    if missing and first:
        raise ValueError(
            f"Dataset {source!r} has no column(s) {missing}; it has {columns}. "
            f"Set label_column / html_column (e.g. -p label_column title) to the right names."
        )
    counts = {"loaded": 0, "empty": 0, "duplicates": 0}

    def cleaned() -> Iterator[dict]:
        seen: set[bytes] = set()
        for index, row in enumerate(itertools.chain(first, rows)):
            counts["loaded"] += 1
            label, html = row.get(label_column), row.get(html_column)
            for column, value in ((label_column, label), (html_column, html)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(
                        f"Row {index} of {source!r}: column {column!r} holds {type(value).__name__} {value!r:.60}, "
                        f"expected text. Fix the row or convert the column to strings."
                    )
            label = " ".join((label or "").split())  # one line, single spaces
            html = (html or "").replace("\r\n", "\n").replace("\r", "\n").strip()
            if not label or not html:
                counts["empty"] += 1
                continue
            key = hashlib.blake2b(f"{label}\x00{html}".encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            yield {"label": label, "html": html}

    clean = arrow_dataset(cleaned(), PAIR_FEATURES)
    if counts["loaded"] == 0:
        raise ValueError(f"Dataset {source!r} has zero rows: nothing to train on")
    if len(clean) == 0:
        raise ValueError(f"Dataset {source!r}: all {counts['loaded']} rows have an empty description or page")
    report = DataReport(
        source=source,
        rows_loaded=counts["loaded"],
        empty_dropped=counts["empty"],
        duplicates_dropped=counts["duplicates"],
        rows_kept=len(clean),
    )
    return clean, report


def split_dataset(
    dataset: datasets.Dataset, validation_fraction: float, test_fraction: float, seed: int
) -> datasets.DatasetDict:
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
    return datasets.DatasetDict(
        {
            "test": dataset.select(order[:n_test]),
            "validation": dataset.select(order[n_test : n_test + n_val]),
            "train": dataset.select(order[n_test + n_val :]),
        }
    )


def load_clean_rows(config: Config) -> tuple[datasets.Dataset, DataReport]:
    """The dataset `config` names, validated, normalised and deduplicated (before triage and the split)."""
    raw = load_raw(config.dataset, config.dataset_encoding)
    columns = ("label", "html") if config.dataset in DATASET_PROFILES else (config.label_column, config.html_column)
    return validate_and_clean(raw, *columns, config.dataset)


def load_splits(config: Config) -> tuple[datasets.DatasetDict, DataReport]:
    """Load, validate, dedupe and split the dataset that `config` names."""
    clean, report = load_clean_rows(config)
    clean, report.flagged, report.unteachable_dropped = triage_and_clean(
        clean, config.drop_unteachable, config.page_cleaning
    )
    report.rows_kept, report.page_cleaning = len(clean), config.page_cleaning
    if len(clean) < 3:
        unteachable = sum(report.unteachable_dropped.values())
        raise ValueError(
            f"Dataset {config.dataset!r}: {report.rows_loaded} rows, {report.empty_dropped} empty, "
            f"{report.duplicates_dropped} duplicates and {unteachable} that cannot teach a page dropped, "
            f"{len(clean)} left; train, validation and test need at least 3 (better hundreds)"
        )
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
    return datasets.DatasetDict(
        {name: arrow_dataset(_jsonl_rows(path, "utf-8"), PAIR_FEATURES) for name, path in files.items()}
    )  # read a line at a time, "\n" only
