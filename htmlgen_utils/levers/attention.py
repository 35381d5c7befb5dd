"""Per-example attention for packed blocks: no [block x block] mask (a memory lever for long blocks)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

PACKED_ATTENTION = "htmlgen_packed_sdpa"
_spans_cache: list = [None, None, None]  # (position ids, their memory and shape, spans)


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """For each row of a packed batch, the [start, end) of every example (position ids restart at 0 for each).

    Read once per forward (one small device-to-host copy, which waits for the GPU) and reused by every layer
    and by checkpoint recompute, which get the same ids, sometimes as a new view: the cache is keyed on the
    memory and shape and holds the tensor, so that memory cannot be reused by another batch meanwhile."""
    key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids.device)
    if _spans_cache[1] == key:
        return _spans_cache[2]
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, position in enumerate(row) if position == 0] or [0]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    _spans_cache[:] = [position_ids, key, spans]
    return spans


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids: torch.Tensor | None = None, **kwargs):
    """Attention for packed blocks without a [block x block] mask: causal SDPA on each example on its own.

    transformers turns restarting position ids into a block-diagonal 4-D mask: 1 GiB (bool) at 32768 tokens,
    and SDPA must then compute every masked-out score and cannot use its FlashAttention kernel. Cutting the
    block at the example boundaries gives the same result (each token sees only its own example, causally)
    with plain `is_causal` SDPA: no mask tensor, and attention work that grows with the examples' lengths
    squared instead of the block's. Anything that is not a packed training block (a padding mask, a KV cache,
    one query token) goes to transformers' own SDPA path unchanged. Measured on the 7B shape it is slower than
    the mask below 16384 tokens and saves memory from there (bench/README.md), so `Config.packed_attention`
    `auto` uses it for long blocks only.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _attention_per_example(module, query, key, value, position_ids, dropout, scaling)


@torch.compiler.disable  # data-dependent cuts: compiled layers run this part eagerly, without a recompile per block
def _attention_per_example(module, query, key, value, position_ids, dropout, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans_per_row = example_spans(position_ids)
    if len(spans_per_row) != query.shape[0]:  # one row of position ids shared by the whole batch
        spans_per_row = spans_per_row[:1] * query.shape[0]
    rows = []
    for row, spans in enumerate(spans_per_row):
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, a:b], key[row:row + 1, :, a:b],
                                         value[row:row + 1, :, a:b], None, dropout=dropout, scaling=scaling)[0]
                  for a, b in spans]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    # like FlashAttention's: no 4-D mask at all when nothing is padded
    AttentionMaskInterface.register(PACKED_ATTENTION, flash_attention_mask)


_register_packed_attention()


@contextmanager
def packed_attention(model, enabled: bool = True):
    """Run the model with `packed_sdpa_attention` inside the block (training and teacher-forced evaluation,
    forward and backward: checkpoint recompute must see the same attention), and restore its own after."""
    config = model.config
    previous = config._attn_implementation
    if enabled and previous == "sdpa":
        config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def use_packed_attention(model) -> None:
    """Switch the model to `packed_sdpa_attention` for good (it falls back to plain SDPA for anything that is
    not a packed block, so generation and padded batches are unaffected)."""
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation = PACKED_ATTENTION
