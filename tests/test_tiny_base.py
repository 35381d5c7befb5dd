"""The shipped tiny base: its card and report agree with the files, and a rebuild follows the recorded curve."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from htmlgen_utils.config import TINY_BASE_DIR
from htmlgen_utils.tiny_base import EARLY_STEPS, RECIPE, build, copy_probe


def test_shipped_base_is_small_and_documented():
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    weights = TINY_BASE_DIR / "model.safetensors"
    assert weights.stat().st_size < 12 * 2**20
    assert report["final_train_loss_last50"] < 0.2
    assert report["steps"] == len(report["loss_log"]) * report["loss_log_every"] == RECIPE["steps"]
    assert report["recipe"] == RECIPE  # the shipped weights are what the recipe in the code makes
    whole = report["whole_pages"]
    assert [len(log) * whole["log_every"] for log in whole["loss_logs"]] == RECIPE["whole_page_rounds"]
    card = (TINY_BASE_DIR / "README.md").read_text()
    assert str(report["final_train_loss_last50"]) in card and "python -m htmlgen_utils.tiny_base" in card


def test_shipped_base_copies_names_from_its_context():
    """What the `tiny` chain's prompt following rests on: the base copies a name from earlier in the page, its own
    brands' and invented ones' (which it cannot have memorised), on validation pages it never saw. A base trained
    like the first one (30 brands, no meta descriptions) scored 0 here."""
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(TINY_BASE_DIR), dtype=torch.float32)
    copying = copy_probe(model, AutoTokenizer.from_pretrained(str(TINY_BASE_DIR)), pages=20)
    assert copying["own_brand"] >= 0.9 and copying["invented_name"] >= 0.9, copying
    assert report["copying"]["invented_name"] >= 0.9


def test_spaces_apart_tokenizer_gives_a_name_one_token_everywhere():
    """' Kite' in a description and '<title>Kite' on a page are the same token, which a model this small needs in
    order to copy; and the saved tokenizer is plain byte-level BPE, which GGUF can describe."""
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BASE_DIR))
    in_prompt = tokenizer("a login page for Kite", add_special_tokens=False).input_ids
    on_page = tokenizer("<title>Kite - Login page</title>", add_special_tokens=False).input_ids
    assert in_prompt[-1] in on_page and tokenizer.convert_ids_to_tokens(in_prompt[-2]) == "Ġ"
    saved = json.loads((TINY_BASE_DIR / "tokenizer.json").read_text())
    assert saved["pre_tokenizer"]["type"] == "ByteLevel"


def test_rebuild_reproduces_the_recorded_loss_curve():
    """The first steps of the same recipe (seeded data, tokenizer, init and batches) draw the recorded first batch
    and give the recorded loss (fp32 on CPU here; the shipped base was built on a GPU, without TF32)."""
    report = json.loads((TINY_BASE_DIR / "build_report.json").read_text())
    rebuilt = build(None, stop_after=EARLY_STEPS)
    assert rebuilt["first_batch"] == report["first_batch"]
    assert rebuilt["early_loss"] == pytest.approx(report["early_loss"], abs=0.002)


def test_shipped_long_page_base_is_the_tiny_base_further_trained_and_documented():
    """`tiny_base_long` shares the tiny base's architecture and tokenizer, has moved from its weights, and its
    card states what it saw."""
    from safetensors.torch import load_file

    from htmlgen_utils.config import TINY_LONG_BASE_DIR

    report = json.loads((TINY_LONG_BASE_DIR / "build_report.json").read_text())
    assert report["final_train_loss_last50"] < 0.2
    assert report["steps"] == len(report["loss_log"]) * report["loss_log_every"]
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


def test_whole_page_rows_start_at_a_document_and_hold_a_whole_page():
    """The whole-page rounds: every row starts with BOS, and the page that opens it ends (EOS) inside the row,
    description in its head and sections after `</main>` together; the first stage's rows cut documents anywhere."""
    from htmlgen_utils.tiny_base import PretrainingStream, pretraining_texts

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BASE_DIR))
    pages, descriptions = pretraining_texts()
    rows = PretrainingStream(tokenizer, pages, descriptions).rows(8, whole_pages=True)
    assert rows.shape == (8, RECIPE["whole_page_seq_len"])
    assert (rows[:, 0] == tokenizer.bos_token_id).all()
    assert all(tokenizer.eos_token_id in row.tolist() for row in rows)
    cut = PretrainingStream(tokenizer, pages, descriptions).rows(8)
    assert not (cut[:, 0] == tokenizer.bos_token_id).all()
