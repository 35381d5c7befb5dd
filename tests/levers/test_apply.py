"""`apply_training_levers` switches on what the config asks for, once."""

import torch

from htmlgen_utils.levers import PACKED_ATTENTION, apply_training_levers, memory_plan
from htmlgen_utils.model import load_for_training
from tests.conftest import BASE


def test_training_levers_apply_once_and_as_configured(tiny_config):
    config = tiny_config.replace(model_id=BASE, packed_attention="on", compile_training=True)
    model, _ = load_for_training(config)
    assert model.config._attn_implementation == "sdpa"  # the plain path has none of them
    assert apply_training_levers(model, config, torch.device("cpu")) == ["packed_attention", "compile_training"]
    assert model.config._attn_implementation == PACKED_ATTENTION
    assert apply_training_levers(model, config, torch.device("cpu")) == ["packed_attention", "compile_training"]
    plain, _ = load_for_training(tiny_config.replace(model_id=BASE))
    assert apply_training_levers(plain, tiny_config, torch.device("cpu")) == []  # offload is for GPUs only
    assert memory_plan(plain) is None  # every layer checkpointed
