from htmlgen_utils.config import BUNDLED_DATA_FILE
from htmlgen_utils.dataset_generator import DEFAULT_SEED, DEFAULT_SIZE, KINDS, datasheet, generate_dataset, to_jsonl
from htmlgen_utils.evaluation import html_problems


def test_regenerating_reproduces_the_committed_file_byte_for_byte():
    rows = generate_dataset(DEFAULT_SIZE, DEFAULT_SEED)
    assert to_jsonl(rows) == BUNDLED_DATA_FILE.read_text(encoding="utf-8")
    assert datasheet(rows, DEFAULT_SEED) == (BUNDLED_DATA_FILE.parent / "DATASHEET.md").read_text(encoding="utf-8")


def test_every_page_is_well_formed_and_the_set_is_varied(bundled_rows):
    assert len(bundled_rows) >= 1000
    bad = [(i, html_problems(r["html"])) for i, r in enumerate(bundled_rows) if html_problems(r["html"])]
    assert bad == []
    assert {r["kind"] for r in bundled_rows} == set(KINDS)
    assert len({r["label"] for r in bundled_rows}) == len(bundled_rows)
    assert len({r["label"].split()[0] for r in bundled_rows}) >= 8  # many phrasings
    assert len({(r["scheme"], r["style"]) for r in bundled_rows}) >= 30


def test_different_seed_gives_different_data():
    assert to_jsonl(generate_dataset(20, 1)) != to_jsonl(generate_dataset(20, 2))
    assert to_jsonl(generate_dataset(20, 1)) == to_jsonl(generate_dataset(20, 1))
