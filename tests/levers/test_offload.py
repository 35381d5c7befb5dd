"""Checkpoints parked in CPU memory give the same gradients."""

import torch

from htmlgen_utils.levers import CheckpointsOnCPU
from htmlgen_utils.loss import next_token_loss
from tests.gradients import assert_same, loss_and_grads


def test_offloaded_checkpoints_give_the_same_gradients(training_model, packed_batch):
    plain = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    hooks = CheckpointsOnCPU(training_model.config.hidden_size, device_type="cpu")  # CPU copies stand in
    offloaded = loss_and_grads(training_model, packed_batch, chunk_tokens=256, hooks=hooks)
    assert_same(plain, offloaded)
    layers = training_model.config.num_hidden_layers
    assert hooks.offloaded >= layers  # at least every layer's checkpoint went through the hook


def test_checkpoint_offload_installed_on_the_decoder_gives_the_same_gradients(training_model, packed_batch):
    """`offload_checkpoints` (what `apply_training_levers` installs) puts the hooks around every training forward of
    the decoder stack, and only there: not in no-grad forwards, and not left on after a forward."""
    from htmlgen_utils.levers import offload_checkpoints

    plain = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    hooks = offload_checkpoints(training_model, device_type="cpu")
    assert_same(plain, loss_and_grads(training_model, packed_batch, chunk_tokens=256))
    moved = hooks.offloaded
    assert moved >= training_model.config.num_hidden_layers
    with torch.no_grad():
        next_token_loss(training_model, packed_batch, 256)
    assert hooks.offloaded == moved  # nothing is saved for backward without gradients
    probe = torch.ones(3, training_model.config.hidden_size, requires_grad=True)
    (probe * probe).sum().backward()  # outside the decoder's forward: no hook is active
    assert hooks.offloaded == moved
