"""Compiled decoder layers give the eager numbers; short runs stay eager."""

import torch

from htmlgen_utils.levers import (
    COMPILE_MIN_STEPS,
    apply_training_levers,
    compile_decoder_layers,
)
from htmlgen_utils.model import load_for_training
from tests.conftest import BASE
from tests.gradients import assert_same, loss_and_grads


def test_compiled_layers_match_eager_ones(training_model, packed_batch):
    """Regional compilation through the real 4-bit + LoRA + checkpointing path: same loss, same gradients,
    with the block mask and with per-example attention (which runs eagerly between compiled pieces)."""
    eager = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    eager_per_example = loss_and_grads(training_model, packed_batch, chunk_tokens=256, attention_per_example=True)
    compile_decoder_layers(training_model)
    layers = training_model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert_same(eager, loss_and_grads(training_model, packed_batch, chunk_tokens=256))
    assert_same(
        eager_per_example, loss_and_grads(training_model, packed_batch, chunk_tokens=256, attention_per_example=True)
    )
    assert not any(name.startswith("_orig_mod") for name, _ in training_model.named_parameters())


def test_a_run_too_short_to_repay_compiling_runs_eagerly(tiny_config, capsys):
    config = tiny_config.replace(model_id=BASE, compile_training=True)
    model, _ = load_for_training(config)
    assert apply_training_levers(model, config, torch.device("cpu"), total_steps=COMPILE_MIN_STEPS - 1) == []
    assert "not compiling for 9 step(s)" in capsys.readouterr().out
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    assert apply_training_levers(model, config, torch.device("cpu"), total_steps=COMPILE_MIN_STEPS) == [
        "compile_training"
    ]
