"""Whole real pages: the truncate_close policy, RoPE scaling for examples beyond the context, generation length from
the data, the repetition stop, and small test splits said out loud."""

import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.data import load_raw
from htmlgen_utils.evaluation import is_valid_html, spec_errors
from htmlgen_utils.model import load_tokenizer
from htmlgen_utils.packing import closing_tags, tokenize_example

TINY = Config.from_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY.model_id)


@pytest.fixture(scope="module")
def long_rows():
    rows = load_raw("bundled-long")
    assert len(rows) == 36 and min(len(r["html"]) for r in rows) >= 5000 and max(len(r["html"]) for r in rows) <= 40000
    return rows


def test_bundled_long_pages_are_realistic_and_valid(long_rows):
    for row in long_rows:
        page = row["html"]
        assert is_valid_html(page), spec_errors(page)[:3]
        assert "<svg" in page and "<script>" in page and "<style>" in page and page.count("<section") >= 3


@pytest.mark.parametrize("max_tokens", [256, 1024, 2048])
def test_truncate_close_teaches_a_complete_valid_page_that_ends(long_rows, tokenizer, max_tokens):
    for row in long_rows:
        example = tokenize_example(tokenizer, row["label"], row["html"], max_tokens, "truncate_close", True)
        assert example["status"] == "truncated" and len(example["input_ids"]) <= max_tokens
        assert example["input_ids"][-1] == tokenizer.eos_token_id  # the model learns to stop
        page = tokenizer.decode(example["input_ids"][example["prompt_length"] :], skip_special_tokens=True)
        assert is_valid_html(page), (spec_errors(page)[:3], page[-200:])
        assert page.rstrip().endswith("</body></html>")
        cut = tokenize_example(tokenizer, row["label"], row["html"], max_tokens, "truncate", True)
        assert cut["input_ids"][-1] != tokenizer.eos_token_id  # `truncate` never teaches stopping mid-page


def test_closing_tags_follow_the_html_standard():
    assert closing_tags("<!DOCTYPE html><html><body><ul><li>a<li>b") == "</li></ul></body></html>"
    assert closing_tags("<!DOCTYPE html><html><body><div><p>one<div>") == "</div></div></body></html>"  # <p> closed
    assert closing_tags("<html><body><svg><g><path d='1'/>") == "</g></svg></body></html>"


def test_a_cut_never_lands_inside_a_script(tokenizer):
    script = "<script>\n" + "if (a > b) { x = '<p>'; }\n" * 40 + "</script>"
    page = f"<!DOCTYPE html><html><head></head><body><div><p>intro</p>{script}<p>after</p></div></body></html>"
    budget = len(tokenizer(page, add_special_tokens=False).input_ids) // 2  # the middle of the script
    prompt = len(tokenizer("x").input_ids) + 40
    example = tokenize_example(tokenizer, "x", page, prompt + budget, "truncate_close", True)
    text = tokenizer.decode(example["input_ids"][example["prompt_length"] :], skip_special_tokens=True)
    assert is_valid_html(text) and "<script>" not in text  # cut before the script, not inside it


def test_long_examples_train_with_rope_scaling(tmp_path):
    """Examples of 2,048 tokens on the tiny base (a 1,024-token context): linear RoPE scaling x2, and training runs."""
    from htmlgen_utils.train import run_training

    config = Config.from_preset(
        "tiny",
        dataset="bundled-long",
        run_dir=str(tmp_path / "run"),
        block_size=2048,
        max_example_tokens=2048,
        max_steps=2,
        checkpoint_every=0,
        eval_every=2,
        max_eval_batches=1,
        test_fraction=0.2,
    )
    state = run_training(config)
    assert state.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in state.history if "loss" in h)
    from htmlgen_utils.model import load_base_model

    scaled = load_base_model(config).config
    parameters = getattr(scaled, "rope_parameters", None) or scaled.rope_scaling
    assert parameters["rope_type"] == "linear" and parameters["factor"] == 2.0
    assert scaled.max_position_embeddings == 2048  # the scaled context, so generating past 1,024 is not warned about
    plain = load_base_model(TINY).config
    assert (getattr(plain, "rope_parameters", None) or plain.rope_scaling or {}).get(
        "rope_type", "default"
    ) == "default"
    assert load_base_model(config.replace(rope_scaling="yarn")).config.rope_parameters["rope_type"] == "yarn"


def test_generation_length_follows_the_data(tmp_path, tokenizer):
    from htmlgen_utils.data import load_splits, save_splits
    from htmlgen_utils.stages import GENERATION_MARGIN, generation_length

    config = Config.from_preset("tiny", run_dir=str(tmp_path / "run"))
    splits, report = load_splits(config)
    save_splits(splits, report, config.run_dir)
    longest = max(
        len(tokenizer(p, add_special_tokens=False).input_ids)
        for name in ("train", "test")
        for p in splits[name]["html"]
    )
    assert generation_length(config, tokenizer) == min(longest + GENERATION_MARGIN, config.max_example_tokens)
    assert generation_length(config.replace(max_new_tokens=123), tokenizer) == 123
    long = config.replace(dataset="bundled-long", run_dir=str(tmp_path / "long"), test_fraction=0.2)
    assert generation_length(long, tokenizer) == long.max_example_tokens  # long pages: as long as training saw


def test_a_page_stuck_in_a_loop_is_stopped_and_counted(tokenizer):
    from htmlgen_utils.generation import RepetitionStop, is_looping

    normal = "<ul>\n" + "".join(f"<li>item {i}</li>\n" for i in range(12)) + "</ul>"
    stuck = "<p>intro</p>\n" + "<p>---------family---------</p>\n" * 9
    assert not is_looping(normal) and is_looping(stuck) and not is_looping("<p>x</p>\n" * 7)
    prompt = tokenizer("### Response:\n", return_tensors="pt").input_ids
    rows = [tokenizer(text, add_special_tokens=False).input_ids for text in (stuck, normal)]
    width = max(len(r) for r in rows)
    width += -width % 16  # the stop checks every 16 new tokens
    batch = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    stop = RepetitionStop(tokenizer, prompt.shape[1])
    done = stop(torch.cat([prompt.repeat(2, 1), batch], dim=1), None)
    assert done.tolist() == [True, False]


def test_small_test_splits_are_said_out_loud():
    from htmlgen_utils.stages import small_data_warning

    assert "Only 2 test example(s)" in small_data_warning(2) and "test_fraction" in small_data_warning(2)
    assert small_data_warning(32) is None


def test_the_token_guard_spares_a_minified_page_at_every_check(tokenizer):
    """Generation checks every 16 tokens whether the last `LOOP_TOKENS` are one short cycle: at no such point of
    a 50k-character minified page, nor of the first 100 bundled pages, does it say so."""
    import json

    from htmlgen_utils.config import BUNDLED_DATA_FILE
    from htmlgen_utils.generation import LOOP_TOKENS, repeats_one_cycle
    from tests.test_evaluation import minified_long_page

    pages = [minified_long_page()] + [json.loads(line)["html"] for line in BUNDLED_DATA_FILE.open()][:100]
    for page in pages:
        ids = tokenizer(page, add_special_tokens=False).input_ids
        assert not any(repeats_one_cycle(ids[:end]) for end in range(LOOP_TOKENS, len(ids) + 1, 16))
    assert repeats_one_cycle(tokenizer("<a class=" + "-" * 400, add_special_tokens=False).input_ids)
