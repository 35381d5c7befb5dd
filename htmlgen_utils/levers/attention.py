"""Attention for packed blocks without the [block x block] mask's wasted work.

Two levers: per-example attention (`packed_sdpa_attention`, a memory lever for long blocks: SDPA on each example
on its own) and block-sparse attention (`flex_packed_attention`, a speed lever: FlexAttention skips every tile
of the block that lies between two examples or above the diagonal).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..config import gpu_is_verified

PACKED_ATTENTION = "htmlgen_packed_sdpa"
FLEX_ATTENTION = "htmlgen_flex"
FLEX_MIN_BLOCK = 4096  # `flex_attention: auto` from this block size
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


def packed_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """Attention for packed blocks without a [block x block] mask: causal SDPA on each example on its own.

    transformers turns restarting position ids into a block-diagonal 4-D mask (block x block bools),
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
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return _attention_per_example(module, query, key, value, position_ids, dropout, scaling)


@torch.compiler.disable  # data-dependent cuts: compiled layers run this part eagerly, without a recompile per block
def _attention_per_example(module, query, key, value, position_ids, dropout, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans_per_row = example_spans(position_ids)
    if len(spans_per_row) != query.shape[0]:  # one row of position ids shared by the whole batch
        spans_per_row = spans_per_row[:1] * query.shape[0]
    rows = []
    for row, spans in enumerate(spans_per_row):
        pieces = [
            sdpa_attention_forward(
                module,
                query[row : row + 1, :, a:b],
                key[row : row + 1, :, a:b],
                value[row : row + 1, :, a:b],
                None,
                dropout=dropout,
                scaling=scaling,
            )[0]
            for a, b in spans
        ]
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


def flex_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for a packed training block as one FlexAttention call that computes only the tiles it needs.

    With the block-diagonal mask, SDPA's memory-efficient kernel computes every score of the block and masks
    most of them away: the bundled data packs ~8 examples into a 4,096-token block, so 13% of the block x block
    scores are ones an example may see. FlexAttention reads a `BlockMask` (which 128 x 128 tiles are empty,
    full or partial) and skips the empty tiles, forward, backward and in checkpoint recompute. The mask comes from
    transformers' own packed-sequence detection (position ids restarting), made a `BlockMask` by
    `flex_or_sdpa_mask`; anything else (generation, evaluation without gradients, padded batches) gets SDPA's
    mask and SDPA."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # eagerly FlexAttention is a slow reference that builds every score; on CUDA it is compiled (inside our
    # compiled layers it is traced with them)
    run = flex_attention if query.device.type != "cuda" or torch.compiler.is_compiling() else _compiled_flex()
    out = run(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _compiled_flex():
    """FlexAttention compiled, once a process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_or_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device="cpu",
    **kwargs,
):
    """A `BlockMask` for a training block (gradients on, no cache, no padding mask), SDPA's mask otherwise."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import add_offsets_to_mask_function, causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    if not (torch.is_grad_enabled() and q_length == kv_length and attention_mask is None):
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device=device, **kwargs
        )
    return create_block_mask(
        add_offsets_to_mask_function(mask_function, q_offset, kv_offset),
        B=batch_size,
        H=None,
        Q_LEN=q_length,
        KV_LEN=kv_length,
        device=device,
        _compile=torch.device(device).type == "cuda",
    )


def _register_flex_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FLEX_ATTENTION, flex_packed_attention)
    AttentionMaskInterface.register(FLEX_ATTENTION, flex_or_sdpa_mask)


_register_flex_attention()


def wants_flex_attention(config, device: torch.device) -> bool:
    """The config's `flex_attention`; `auto` is blocks of 4,096 tokens or more on CUDA GPUs of compute capability
    8.0 or more, where it was measured (bench/README.md). A T4 (7.5) keeps the block mask: torch gives
    FlexAttention's backward 16 x 16 tiles there, and it is not measured."""
    if config.flex_attention != "auto":
        return config.flex_attention == "on"
    return config.block_size >= FLEX_MIN_BLOCK and device.type == "cuda" and gpu_is_verified()


def use_flex_attention(model) -> None:
    """Switch the model to `flex_packed_attention` for good (SDPA for anything that is not a training block)."""
    if model.config._attn_implementation in ("sdpa", PACKED_ATTENTION):
        model.config._attn_implementation = FLEX_ATTENTION
