"""Compiled decoding and our batch-1 loop write the pages `generate` writes."""

import torch

from htmlgen_utils.config import Config
from htmlgen_utils.generation import clean_page, generate_pages, stream_page
from htmlgen_utils.model import (
    load_for_training,
)
from htmlgen_utils.packing import build_prompt
from tests.models import adapted_tiny_model


def test_static_cache_decoding_writes_the_same_pages(chain):
    model, tokenizer = adapted_tiny_model(chain[0])
    descriptions = [
        "A modern landing page for Acme in blue",
        "Build a retro 404 error page for Nova.",
        "A login page for Orbit",
        "A blog about cats with a dark theme",
        "Portfolio",
    ]
    eager = generate_pages(model, tokenizer, descriptions, max_new_tokens=48, batch_size=2)
    static = generate_pages(model, tokenizer, descriptions, max_new_tokens=48, batch_size=2, compile_decode=True)
    assert static.pages == eager.pages and static.new_tokens == eager.new_tokens
    assert static.settings["compile_decode"] is True
    caches = model.__dict__["_htmlgen_static_caches"]
    assert list(caches) == [(2, 256)]  # one cache (every batch filled to 2 rows) reused by all three batches
    two = descriptions[:2]
    longer = generate_pages(model, tokenizer, two, max_new_tokens=300, batch_size=2, compile_decode=True)
    assert list(caches) == [(2, 256), (2, 512)]  # a longer request builds a longer cache ...
    shorter = generate_pages(model, tokenizer, two, max_new_tokens=48, batch_size=2, compile_decode=True)
    assert list(caches) == [(2, 256), (2, 512)]  # ... which a shorter one then reuses, with the same pages
    assert shorter.pages == generate_pages(model, tokenizer, two, max_new_tokens=48, batch_size=2).pages
    assert longer.pages == generate_pages(model, tokenizer, two, max_new_tokens=300, batch_size=2).pages
    streamed = "".join(stream_page(model, tokenizer, descriptions[1], max_new_tokens=48, compile_decode=True))
    assert streamed.strip().startswith(eager.pages[1][:40])


def test_own_decode_loop_writes_what_generate_writes(chain):
    """Batch 1 with `compile_decode` runs `decode_one` (on CPU its step runs eagerly): the same greedy pages and
    token counts as `generate`, cut at `</html>` or EOS at the exact token even when that falls mid-piece."""
    from htmlgen_utils.levers.decoding import STOP_CHECK_TOKENS, decode_one

    model, tokenizer = adapted_tiny_model(chain[0])
    descriptions, lengths = ["Build a retro 404 error page for Nova."], []  # a short page, whole, twice each way
    for stop in (True, False):  # `</html>` stop string, then EOS only
        plain = generate_pages(model, tokenizer, descriptions, max_new_tokens=900, stop_at_html_end=stop)
        ours = generate_pages(
            model, tokenizer, descriptions, max_new_tokens=900, batch_size=1, compile_decode=True, stop_at_html_end=stop
        )
        assert ours.pages == plain.pages and ours.new_tokens == plain.new_tokens
        lengths += plain.new_tokens
    assert all(n < 900 for n in lengths) and any(n % STOP_CHECK_TOKENS for n in lengths)  # an end mid-piece
    ids = tokenizer(build_prompt(descriptions[0]), return_tensors="pt").input_ids
    pieces = list(decode_one(model, tokenizer, ids, max_new_tokens=40, stop_at_html_end=False))
    assert [len(p) for p in pieces] == [16, 16, 8]  # read back every STOP_CHECK_TOKENS, and the rest at the limit
    streamed = "".join(stream_page(model, tokenizer, descriptions[0], max_new_tokens=900, compile_decode=True))
    assert clean_page(streamed) == plain.pages[0]


def test_one_query_attention_equals_sdpa_and_hands_prompts_to_it():
    """A decode step's attention as two matmuls and a softmax gives SDPA's output, with SDPA's bool mask (unfilled
    cache slots hidden) and with grouped-query heads; more than one query (a prompt) goes to SDPA itself."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from htmlgen_utils.levers.decoding import one_query_attention

    torch.manual_seed(0)
    for heads, kv_heads in ((4, 4), (8, 2)):
        module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
        key, value = torch.randn(2, kv_heads, 40, 16), torch.randn(2, kv_heads, 40, 16)
        query = torch.randn(2, heads, 1, 16)
        mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., :25], mask[1, ..., :7] = True, True  # a static cache filled to 25 and to 7 slots
        ours = one_query_attention(module, query, key, value, mask, scaling=0.25)[0]
        sdpa = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)[0]
        torch.testing.assert_close(ours, sdpa)
        key[1, :, 7:] = 1e4  # what a hidden slot holds must not matter
        torch.testing.assert_close(one_query_attention(module, query, key, value, mask, scaling=0.25)[0], sdpa)
    prompt = torch.randn(1, 4, 5, 16)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    torch.testing.assert_close(
        one_query_attention(module, prompt, prompt, prompt, None, scaling=0.25)[0],
        sdpa_attention_forward(module, prompt, prompt, prompt, None, scaling=0.25)[0],
    )


def test_one_token_lora_matrices_compute_what_linear_computes():
    """`OneTokenLinear` multiplies one token as a multiply-and-sum and anything larger as `nn.Linear`: both give
    the layer's own product; `use_one_token_lora` switches every LoRA matrix in place, once."""
    from htmlgen_utils.levers.decoding import OneTokenLinear, use_one_token_lora

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=True)
    x_one, x_many = torch.randn(1, 1, 64), torch.randn(3, 5, 64)
    expected = linear(x_one), linear(x_many)
    linear.__class__ = OneTokenLinear
    torch.testing.assert_close(linear(x_one), expected[0])
    torch.testing.assert_close(linear(x_many), expected[1])
    model, _ = load_for_training(Config.from_preset("tiny"))
    layers = model.config.num_hidden_layers
    assert use_one_token_lora(model) == 2 * 7 * layers  # A and B of q, k, v, o, gate, up, down in every layer
    assert use_one_token_lora(model) == 0
    assert all(
        type(m) is OneTokenLinear for name, m in model.named_modules() if ".lora_A." in name or ".lora_B." in name
    )


def test_own_decode_loop_with_a_trained_adapter_writes_what_generate_writes(chain):
    """With the chain's trained LoRA adapter (on, the model writes pages; off, the base mostly stops), `decode_one`
    (one-query attention, one-token LoRA matrices, its `DecodeStep` from fixed token and position buffers) writes
    `generate`'s pages; a second page reuses the step its cache was built with."""
    model, tokenizer = adapted_tiny_model(chain[0])
    descriptions = ["A modern landing page for Acme in blue", "Build a retro 404 error page for Nova."]
    with model.disable_adapter():
        base_pages = generate_pages(model, tokenizer, descriptions, max_new_tokens=150).pages
    plain = generate_pages(model, tokenizer, descriptions, max_new_tokens=150)
    assert plain.pages != base_pages  # the adapter matters
    ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=150, batch_size=1, compile_decode=True)
    assert ours.pages == plain.pages and ours.new_tokens == plain.new_tokens
    steps = list(model.__dict__["_htmlgen_decode_steps"].values())
    assert len(steps) == 1  # both pages ran on one cache and its one step
    for name, parameter in model.named_parameters():  # the adapter changes (back to its start): pages see it
        if "lora_B" in name:
            parameter.data.zero_()
    ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=150, batch_size=1, compile_decode=True)
    assert ours.pages == base_pages


def test_compiled_decoding_lifts_the_training_hook_for_the_call():
    """A model prepared for training carries transformers' hook that makes the embeddings' output require grad;
    torch 2.11's compiler cannot trace it and splits the decode step around it, so compiled decoding takes it
    off for each step and puts it back (training after generation still gets it)."""
    from htmlgen_utils.levers import compiled_decoding
    from htmlgen_utils.model import load_for_training

    model, tokenizer = load_for_training(Config.from_preset("tiny", gradient_checkpointing=True))
    embeddings = model.get_input_embeddings()
    hook_names = lambda: [hook.__name__ for hook in embeddings._forward_hooks.values()]  # noqa: E731
    assert hook_names() == ["make_inputs_require_grads"]
    with compiled_decoding(model):
        assert hook_names() == []
    assert hook_names() == ["make_inputs_require_grads"]
    model.eval()
    plain = generate_pages(model, tokenizer, ["A login page for Orbit"], max_new_tokens=24)
    ours = generate_pages(
        model, tokenizer, ["A login page for Orbit"], max_new_tokens=24, batch_size=1, compile_decode=True
    )
    assert ours.pages == plain.pages and hook_names() == ["make_inputs_require_grads"]


class ReplayedStep:
    """A stand-in for a captured CUDA graph on CPU: whatever the adapter state at the call, the step computes with
    the state it was built ("captured") under, as a graph replays the kernels it recorded."""

    def __init__(self, step):
        from htmlgen_utils.levers.decoding import adapter_state

        self.step, self.captured = step, adapter_state(step.model)

    def __call__(self, token, position):
        layers = [m for m in self.step.model.modules() if hasattr(m, "lora_A")]
        now = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = self.captured[1]
        try:
            return self.step(token, position)
        finally:
            for layer, disabled in zip(layers, now):
                layer._disable_adapters = disabled


def test_a_step_captured_with_the_adapter_never_serves_the_base_model(chain, monkeypatch):
    """After a batch-1 decode with the adapter, the base model's pages (`disable_adapter`) are the base model's:
    the captured step is kept per adapter state. Without the adapter state in the step's key, the step captured
    with the adapter on would be replayed and write the adapter's pages as the base model's."""
    from htmlgen_utils.levers import decoding

    built = decoding.DecodeStep
    monkeypatch.setattr(decoding, "DecodeStep", lambda *args, **kwargs: ReplayedStep(built(*args, **kwargs)))
    model, tokenizer = adapted_tiny_model(chain[0])
    descriptions = ["A modern landing page for Acme in blue"]
    adapted = generate_pages(model, tokenizer, descriptions, max_new_tokens=80, batch_size=1, compile_decode=True)
    with model.disable_adapter():
        base = generate_pages(model, tokenizer, descriptions, max_new_tokens=80, batch_size=1, compile_decode=True)
        plain_base = generate_pages(model, tokenizer, descriptions, max_new_tokens=80)
    assert adapted.pages != plain_base.pages  # the adapter matters
    assert base.pages == plain_base.pages
    assert len(model.__dict__["_htmlgen_decode_steps"]) == 2  # one step per adapter state, same cache


def test_own_decode_loop_picks_tokens_as_generate_does_with_every_setting(chain):
    """`decode_one` applies `generate`'s logits processors: greedy with a repetition penalty and an n-gram ban,
    and sampling with a fixed seed (temperature, top-k 50 from the generation config, top-p) give `generate`'s
    pages token for token; each setting changes the page, so a loop that ignored it would not."""
    model, tokenizer = adapted_tiny_model(chain[0])
    descriptions = ["A pricing table for Orbit with three plans"]
    # strong settings: the fine-tuned model is sure of its pages, and a mild one would change nothing
    settings = [dict(repetition_penalty=2.0), dict(no_repeat_ngram_size=2),
                dict(do_sample=True, temperature=3.0, top_p=0.97, seed=3)]  # fmt: skip
    for setting in settings:
        plain = generate_pages(model, tokenizer, descriptions, max_new_tokens=60, stop_on_repetition=False, **setting)
        ours = generate_pages(model, tokenizer, descriptions, max_new_tokens=60, stop_on_repetition=False,
                              batch_size=1, compile_decode=True, **setting)  # fmt: skip
        assert ours.pages == plain.pages and ours.new_tokens == plain.new_tokens, setting
        default = generate_pages(model, tokenizer, descriptions, max_new_tokens=60, stop_on_repetition=False)
        assert plain.pages != default.pages, setting  # the setting mattered
