"""Per-example and block-sparse attention for packed blocks give the block mask's numbers."""

import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.levers import (
    PACKED_ATTENTION,
    apply_training_levers,
    example_spans,
)
from htmlgen_utils.loss import next_token_loss
from htmlgen_utils.model import load_for_training
from tests.conftest import BASE
from tests.gradients import assert_same, loss_and_grads


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the reference, on purpose
def test_flex_attention_matches_the_block_mask_and_skips_the_empty_tiles(training_model, packed_batch, monkeypatch):
    """Block-sparse FlexAttention (its eager reference here: CPU has no FlexAttention backward, so the gradients
    are checked on the GPU, tests/test_gpu.py) gives the loss of SDPA with the block mask through the real 4-bit
    + LoRA path; its `BlockMask` leaves out the tiles between examples; without gradients (evaluation,
    generation) the model is back on SDPA's mask."""
    import torch.nn.attention.flex_attention as flex

    from htmlgen_utils.levers import FLEX_ATTENTION, use_flex_attention

    training_model.get_base_model().disable_input_require_grads()
    training_model.requires_grad_(False)  # a training forward (gradients on) with nothing to differentiate
    masked = next_token_loss(training_model, packed_batch, 256)
    masks = []
    real_flex = flex.flex_attention
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: masks.append(k["block_mask"]) or real_flex(*a, **k))
    use_flex_attention(training_model)
    assert training_model.config._attn_implementation == FLEX_ATTENTION
    torch.testing.assert_close(next_token_loss(training_model, packed_batch, 256), masked)
    assert len(masks) == training_model.config.num_hidden_layers
    tiles = masks[0].to_dense()  # [batch, heads, query tiles, key tiles]: 1 where a tile is computed
    assert 0 < tiles.sum() < torch.ones(tiles.shape[-2:]).tril().sum() * tiles.shape[0]  # fewer than causal's
    with torch.no_grad():
        training_model(**packed_batch, use_cache=False)
    assert len(masks) == training_model.config.num_hidden_layers  # no gradients: SDPA


def test_per_example_attention_matches_the_block_mask(training_model, packed_batch):
    masked = loss_and_grads(training_model, packed_batch, chunk_tokens=256)
    per_example = loss_and_grads(training_model, packed_batch, chunk_tokens=256, attention_per_example=True)
    assert_same(masked, per_example)
    assert training_model.config._attn_implementation == "sdpa"  # restored after the block
    # and it is really a different path: without restarting position ids the two disagree
    unpacked = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1]).expand(2, -1)}
    leaked = loss_and_grads(training_model, unpacked, chunk_tokens=256, attention_per_example=True)
    worst = max((leaked[1][k] - per_example[1][k]).abs().max() for k in per_example[1])
    assert worst > 1e-2 * max(g.abs().max() for g in per_example[1].values())
    assert abs(float(leaked[0]) - float(per_example[0])) > 1e-3


def test_example_spans_follow_restarting_position_ids():
    ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert example_spans(ids) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert example_spans(ids) is example_spans(ids)  # read once, reused by every layer


def test_flex_attention_switches_on_where_measured(tiny_config, monkeypatch):
    """`flex_attention: auto` is blocks of 4,096+ on GPUs of compute capability 8.0+ (a T4 keeps the block mask);
    when on, it replaces per-example attention."""
    from htmlgen_utils.levers import FLEX_ATTENTION, wants_flex_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t4_preset = Config.from_preset("colab-t4")  # 4,096-token blocks
    import htmlgen_utils.config as config_module

    monkeypatch.setattr(config_module, "gpu_capability", lambda: (9, 0))
    assert wants_flex_attention(t4_preset, cuda) and not wants_flex_attention(
        t4_preset.replace(block_size=2048, max_example_tokens=2048), cuda
    )
    assert not wants_flex_attention(t4_preset, cpu) and not wants_flex_attention(
        t4_preset.replace(flex_attention="off"), cuda
    )
    monkeypatch.setattr(config_module, "gpu_capability", lambda: (7, 5))
    assert not wants_flex_attention(t4_preset, cuda)
    config = tiny_config.replace(model_id=BASE, packed_attention="on", flex_attention="on")
    model, _ = load_for_training(config)
    assert apply_training_levers(model, config, cpu) == ["flex_attention"]
    assert model.config._attn_implementation == FLEX_ATTENTION
    with pytest.raises(ValueError, match="flex_attention"):
        Config.from_preset("colab-t4", flex_attention=True)


def test_long_block_levers_switch_on_where_measured():
    short = Config.from_preset("ampere-bf16")
    long = Config.from_preset("ampere-bf16", block_size=16384, max_example_tokens=2048)
    assert not short.long_block_lever("offload_activations") and not short.long_block_lever("packed_attention")
    assert long.long_block_lever("offload_activations") and long.long_block_lever("packed_attention")
    assert Config.from_preset("colab-t4-low-memory").long_block_lever("offload_activations")  # at every size
    assert not Config.from_preset("colab-t4").long_block_lever("offload_activations")  # spends memory on speed
    assert not long.replace(packed_attention="off").long_block_lever("packed_attention")
    with pytest.raises(ValueError, match="offload_activations"):
        Config.from_preset("colab-t4", offload_activations=True)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        Config.from_preset("colab-t4", loss_chunk_tokens=-1)
    assert PACKED_ATTENTION != "sdpa"
