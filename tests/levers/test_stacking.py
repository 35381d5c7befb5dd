"""Stacked q/k/v and gate/up compute what the layers compute."""

import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.model import load_for_training


def test_stacked_layers_compute_what_the_layers_compute():
    """q/k/v and gate/up stacked, o and down as groups of one (one 4-bit product and one LoRA product a group
    for one token) give the model's own logits, with the adapter mattering; the members' 4-bit weights are views
    into the stacked one (no second copy), and the stacked absmax and LoRA B are what ran (doubling either changes
    the logits); prompts run the layers themselves; a member called out of order is refused; afterwards the
    model's modules are their own again."""

    from htmlgen_utils.levers.stacking import shared_input_groups, stacked_layers

    model, tokenizer = load_for_training(Config.from_preset("tiny"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    groups = shared_input_groups(model)
    assert len(groups) == 4 * model.config.num_hidden_layers and [len(g.members) for g in groups[:4]] == [3, 1, 2, 1]
    assert groups[1].weight.data_ptr() == groups[1].members[0].get_base_layer().weight.data_ptr()  # no copy
    assert shared_input_groups(model) is groups  # built once, kept on the model
    stacked = groups[0].weight
    for member in groups[0].members:
        weight = member.get_base_layer().weight
        assert weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    modules_before = {name: type(module) for name, module in model.named_modules()}
    model.eval()
    ids = tokenizer("Below is an instruction that describes a task.", return_tensors="pt").input_ids

    def next_logits(stacked_now: bool, tokens: int = 1) -> torch.Tensor:
        prompt = model(input_ids=ids[:, :-tokens], use_cache=True)
        with stacked_layers(groups) if stacked_now else torch.no_grad():
            return model(input_ids=ids[:, -tokens:], cache=prompt.past_key_values).logits

    with torch.no_grad():
        plain = next_logits(False)
        with model.disable_adapter():
            assert (next_logits(False) - plain).abs().max() > 1e-3  # the adapter matters
            torch.testing.assert_close(next_logits(True), next_logits(False))  # ... and is off when disabled
        torch.testing.assert_close(next_logits(True), plain, rtol=1e-5, atol=1e-5)
        whole_prompt = model(input_ids=ids).logits
        with stacked_layers(groups):  # a prompt runs the layers themselves
            torch.testing.assert_close(model(input_ids=ids).logits, whole_prompt)
        for tensor in (groups[0].state.absmax, groups[0].lora_b):
            tensor *= 2
            assert (next_logits(True) - plain).abs().max() > 1e-3
            tensor /= 2
        member = groups[0].members[1]
        with stacked_layers(groups), pytest.raises(RuntimeError, match="out of order"):
            member(torch.randn(1, 1, model.config.hidden_size))
    assert {name: type(module) for name, module in model.named_modules()} == modules_before


def test_decode_layout_is_built_only_where_a_quarter_of_the_gpu_stays_free():
    """The rule the default decode layout is built by, group after group, on a T4 (14.7 GiB) holding a 7B
    model: right after loading (~11 GiB free) all 128 groups get their copy (~3.6 GB) and more than a quarter
    stays free; with a training run's memory still in use (6 GiB free) only some do, and the quarter is kept."""
    from types import SimpleNamespace

    from htmlgen_utils.levers.column_words import column_words_bytes
    from htmlgen_utils.levers.stacking import KEEP_FREE_SHARE, room_for_copy

    shapes = [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)] * 32  # q/k/v, o, gate/up, down
    sizes = [column_words_bytes(SimpleNamespace(shape=torch.Size(shape), blocksize=64)) for shape in shapes]
    total = int(14.7 * 2**30)

    def build(free: int) -> tuple[int, int]:
        built = 0
        for size in sizes:
            if room_for_copy(size, free, total):
                free, built = free - size, built + 1
        return built, free

    assert 3.5e9 < sum(sizes) < 3.7e9
    built, left = build(11 * 2**30)
    assert built == len(sizes) and left >= KEEP_FREE_SHARE * total
    built, left = build(6 * 2**30)
    assert 0 < built < len(sizes) and left >= KEEP_FREE_SHARE * total
