import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.generation import clean_page, generate_pages
from htmlgen_utils.model import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def page_writer(chain):
    """The tiny chain's fine-tuned model (the shipped base through the real 4-bit path, plus its LoRA adapter)."""
    from tests.models import adapted_tiny_model

    return adapted_tiny_model(chain[0])


DESCRIPTIONS = [
    "A modern landing page for Acme in blue",
    "Build a retro 404 error page for Nova.",
    "A login page for Orbit with a dark colour scheme and a minimalist look",
]


def test_clean_page():
    assert clean_page("  <html><body></body></html>\n<html>again") == "<html><body></body></html>"
    assert clean_page("<p>no end") == "<p>no end"


def test_stops_at_html_end_and_respects_max_new_tokens(page_writer):
    model, tokenizer = page_writer
    unstopped = generate_pages(model, tokenizer, DESCRIPTIONS[:1], max_new_tokens=600, stop_at_html_end=False)
    stopped = generate_pages(model, tokenizer, DESCRIPTIONS[:1], max_new_tokens=600)
    assert "</html>" in stopped.pages[0] and stopped.pages[0].endswith("</html>")
    assert stopped.new_tokens[0] <= unstopped.new_tokens[0]
    short = generate_pages(model, tokenizer, DESCRIPTIONS[:2], max_new_tokens=7)
    assert short.new_tokens == [7, 7]
    assert stopped.tokens_per_s > 0 and short.summary()["examples"] == 2


def test_stops_at_eos_without_a_stop_string(page_writer):
    model, tokenizer = page_writer
    # it was trained on pages that end with EOS: with no stop string it must stop there by itself
    result = generate_pages(model, tokenizer, DESCRIPTIONS[:1], max_new_tokens=900, stop_at_html_end=False)
    assert result.new_tokens[0] < 900
    assert result.pages[0].rstrip().endswith("</html>")


def test_batched_equals_one_by_one_under_greedy(page_writer):
    model, tokenizer = page_writer
    batched = generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=80, batch_size=3)
    single = generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=80, batch_size=1)
    assert batched.pages == single.pages
    assert batched.new_tokens == single.new_tokens


def test_sampling_is_seeded(page_writer):
    model, tokenizer = page_writer
    a = generate_pages(model, tokenizer, DESCRIPTIONS[:1], max_new_tokens=30, do_sample=True, seed=1)
    b = generate_pages(model, tokenizer, DESCRIPTIONS[:1], max_new_tokens=30, do_sample=True, seed=1)
    assert a.pages == b.pages


def test_streaming_gives_the_same_page_as_greedy_generation(page_writer):
    from htmlgen_utils.generation import stream_page

    model, tokenizer = page_writer
    streamed = "".join(stream_page(model, tokenizer, DESCRIPTIONS[1], max_new_tokens=40))
    batch = generate_pages(model, tokenizer, DESCRIPTIONS[1:2], max_new_tokens=40)
    assert clean_page(streamed) == batch.pages[0] and batch.pages[0]


def test_playground_button_renders_a_sandboxed_page(page_writer):
    from htmlgen_utils.rendering import playground

    model, tokenizer = page_writer
    box = playground(model, tokenizer, max_new_tokens=32)
    text, controls, status, preview = box.children
    text.value = DESCRIPTIONS[2]
    controls.children[0].click()
    assert "characters" in status.value
    assert '<iframe sandbox=""' in preview.value


def test_a_one_line_loop_stops_early_on_every_path():
    """A model that writes `-` forever (its head replaced by one that always picks the dash token) writes one
    line, which the line rule cannot see: the token-cycle guard stops it at its first check after `LOOP_TOKENS`,
    batched through `generate` and one page at a time through `decode_one`, and counts it. Without the guard the
    page runs to the limit."""
    from htmlgen_utils.generation import LOOP_TOKENS

    config = Config.from_preset("tiny")
    model, tokenizer = load_base_model(config), load_tokenizer(config.model_id)
    dash = tokenizer("--", add_special_tokens=False).input_ids[0]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[dash] = 10.0
    model.lm_head = head
    descriptions = ["A modern landing page for Acme in blue", "A login page for Orbit"]
    for batch_size, compiled in ((2, False), (1, True)):
        stopped = generate_pages(model, tokenizer, descriptions, 300, batch_size=batch_size, compile_decode=compiled)
        assert stopped.endings == ["repetition"] * 2 and all(n <= LOOP_TOKENS + 16 for n in stopped.new_tokens)
        assert "\n" not in stopped.pages[0] and set(stopped.pages[0]) == {"-"}
    running = generate_pages(model, tokenizer, descriptions, 300, stop_on_repetition=False)
    assert running.new_tokens == [300, 300] and running.endings == ["token limit"] * 2
