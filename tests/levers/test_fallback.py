"""Every compiled, captured or custom-kernel path falls back to the plain path when it fails: one line says what
failed, the run completes, and the numbers are the plain path's. Each failure is injected where the real one
would happen (CPU stand-ins where the real thing needs CUDA)."""

import pytest
import torch

from htmlgen_utils.config import TINY_BASE_DIR, Config
from htmlgen_utils.generation import generate_pages, stream_page
from htmlgen_utils.levers import decoding
from htmlgen_utils.model import load_for_training
from tests.models import adapted_tiny_model

DESCRIPTIONS = ["A modern landing page for Acme in blue", "Build a retro 404 error page for Nova."]


@pytest.fixture(scope="module")
def plain_pages(chain):
    model, tokenizer = adapted_tiny_model(chain[0])
    return generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=60).pages


def _fail(message):
    def raising(*args, **kwargs):
        raise RuntimeError(message)

    return raising


def _one_fallback_line(printed: str, lever: str) -> None:
    lines = [line for line in printed.splitlines() if f"{lever} failed" in line]
    assert len(lines) == 1 and "continuing on the plain path" in lines[0], printed


def test_a_failed_compile_of_the_batched_decode_step_generates_plainly(chain, monkeypatch, capsys, plain_pages):
    model, tokenizer = adapted_tiny_model(chain[0])
    monkeypatch.setattr("htmlgen_utils.generation.generate_with_static_cache", _fail("inductor: compile failed"))
    pages = generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=60, batch_size=2, compile_decode=True).pages
    assert pages == plain_pages
    _one_fallback_line(capsys.readouterr().out, "compile_generation")
    # remembered: the next call does not try again, and says nothing more
    assert (
        generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=60, batch_size=2, compile_decode=True).pages
        == plain_pages
    )
    assert "failed" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["graph capture", "first step"])
def test_a_failed_one_page_decode_step_generates_plainly(chain, monkeypatch, capsys, plain_pages, where):
    """Graph capture fails as the step is built (`DecodeStep`), or a kernel fails as the first token runs."""
    model, tokenizer = adapted_tiny_model(chain[0])
    message = "CUDA error: operation not permitted when stream is capturing"
    if where == "graph capture":
        monkeypatch.setattr(decoding.DecodeStep, "__init__", _fail(message))
    else:
        monkeypatch.setattr(decoding.DecodeStep, "__call__", _fail("triton: out of resources: shared memory"))
    pages = generate_pages(model, tokenizer, DESCRIPTIONS, max_new_tokens=60, batch_size=1, compile_decode=True).pages
    assert pages == plain_pages
    _one_fallback_line(capsys.readouterr().out, "compile_generation")


def test_a_failed_streaming_decode_streams_plainly(chain, monkeypatch, capsys):
    model, tokenizer = adapted_tiny_model(chain[0])
    expected = "".join(stream_page(model, tokenizer, DESCRIPTIONS[0], 40))
    monkeypatch.setattr(decoding.DecodeStep, "__init__", _fail("graph capture failed"))
    monkeypatch.setattr("htmlgen_utils.generation.decode_one", _raising_generator)
    assert "".join(stream_page(model, tokenizer, DESCRIPTIONS[0], 40, compile_decode=True)) == expected
    _one_fallback_line(capsys.readouterr().out, "compile_generation")


def _raising_generator(*args, **kwargs):
    raise RuntimeError("graph capture failed")
    yield  # a generator, as decode_one is


def test_a_failed_compile_of_the_decoder_layers_trains_eagerly_to_the_same_adapter(tiny_config, monkeypatch, capsys):
    """The compiled layers fail in the first step (as a compile error does, inside the forward): the step is run
    again eagerly, one line says so, and the run trains the adapter the eager run trains."""
    from peft import get_peft_model_state_dict

    from htmlgen_utils.levers import compile as compile_module
    from htmlgen_utils.packing import load_packed
    from htmlgen_utils.stages import prepare_data
    from htmlgen_utils.train import train

    config = tiny_config.replace(
        model_id=str(TINY_BASE_DIR),
        max_steps=10,
        gradient_accumulation_steps=1,
        checkpoint_every=0,
        eval_every=100,
        lora_dropout=0.0,
    )
    prepare_data(config)
    packed = load_packed(config.run_dir)

    def trained(compile_training):
        model, tokenizer = load_for_training(config.replace(compile_training=compile_training))
        train(model, tokenizer, packed, config.replace(compile_training=compile_training), config.run_dir, resume=False)
        return get_peft_model_state_dict(model)

    eager = trained("off")
    monkeypatch.setattr(
        compile_module.torch, "compile", lambda function, **kwargs: _fail("inductor: C compiler not found")
    )
    capsys.readouterr()
    fallen_back = trained("on")
    _one_fallback_line(capsys.readouterr().out, "compile_training")
    assert eager.keys() == fallen_back.keys()
    assert all(torch.equal(eager[name], fallen_back[name]) for name in eager)


@pytest.mark.parametrize("capability, on", [((7, 5), False), ((8, 0), True), ((9, 0), True), (None, False)])
def test_unverified_paths_are_off_by_default_below_compute_capability_8(monkeypatch, capability, on):
    """What has never run on a T4 (compiled layers, the compiled decode step, FlexAttention) is off there under
    `auto`, and `on` opts in."""
    import htmlgen_utils.config as config_module
    from htmlgen_utils.levers.attention import wants_flex_attention

    monkeypatch.setattr(config_module, "gpu_capability", lambda: capability)
    for preset in ("colab-t4", "colab-t4-low-memory", "ampere-bf16"):
        config = Config.from_preset(preset)
        assert config.compiles("compile_training") is on and config.compiles("compile_generation") is on
        assert Config.from_preset(preset, compile_training="on").compiles("compile_training")
        assert not Config.from_preset(preset, compile_generation=False).compiles("compile_generation")
    assert wants_flex_attention(Config.from_preset("colab-t4"), torch.device("cuda")) is on


def test_the_api_compiles_its_decode_step_before_the_first_request(chain):
    from htmlgen_utils.serve import create_app

    model, tokenizer = adapted_tiny_model(chain[0])
    create_app(model, tokenizer, max_new_tokens_cap=32, compile_decode=True)
    assert model.__dict__.get("_htmlgen_decode_steps")  # built (on a GPU: compiled and captured) already
