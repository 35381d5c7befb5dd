"""A 4-bit product for a few tokens at once that reads each weight once: the price of checking a draft.

Batch-1 decoding reads all the 4-bit weights for every token. A step that checks a drafted continuation of a
few tokens (`decoding.decode_one`'s lookahead) runs the same weights over those tokens; if the weights are read
once for all of them, the step costs about what a one-token step costs. bitsandbytes' fused kernel does not
do that at these sizes: on an H200 two tokens cost 1.56x one, four 2.47x (bench/README.md,
`few_token_products.py`). This Triton kernel reads bitsandbytes' NF4 layout as stored (two 4-bit codes a
byte, the first in the high nibble; one absmax per 64 weights, as float32 or double-quantised as the model
loads it), unpacks a tile of weights once and multiplies it by all the tokens (up to 16, one tensor-core tile
of rows) on the tensor cores. Its cost is flat in the tokens, but at 1.83-1.88x bitsandbytes' one-token product
for 2 to 8 tokens (H200) it is not cheap enough for the lookahead to pay, which stays off by default; alone it
costs 1.72x bitsandbytes' for one token too. An earlier form that multiplied each unpacked tile by each token
in registers cost what bitsandbytes costs (2.60x one token for five on an H100): every token paid its own sums
across threads.

`few_token_product` uses it on CUDA for 2 to `FEW_TOKENS` tokens of an NF4 weight and leaves everything else
to `bnb.matmul_4bit` (one token, CPU, other formats): the same product either way, to fp16 rounding.
"""
from __future__ import annotations

import functools

import torch

FEW_TOKENS = 16  # the most tokens the kernel multiplies at once (one tensor-core tile of rows)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # num_stages=1: software pipelining would turn the table lookups that feed the products into one 4-byte
    # asynchronous copy per weight (13x slower than bitsandbytes on an H100); the plain loads hit the L1 cache
    configs = [triton.Config({"BLOCK_N": n, "BLOCKS": b, "SPLIT_K": k}, num_warps=w, num_stages=1)
               for n, b, k, w in [(64, 2, 4, 4), (32, 2, 4, 4), (64, 4, 2, 4), (128, 2, 2, 4), (64, 2, 8, 4),
                                  (32, 4, 4, 4), (64, 1, 8, 4), (128, 1, 4, 8), (32, 2, 8, 2), (64, 4, 4, 8),
                                  (16, 4, 4, 2), (128, 4, 1, 8), (32, 1, 8, 2), (16, 2, 8, 1)]]

    @triton.autotune(configs=configs, key=["rows", "cols"], reset_to_zero=["out_ptr"])
    @triton.jit
    def nf4_few_tokens(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
                       rows, cols, TOKENS: tl.constexpr, NESTED: tl.constexpr, OUTER_BLOCK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, SPLIT_K: tl.constexpr):
        # a program: BLOCK_N weight rows over its share (1 / SPLIT_K) of the columns, BLOCKS absmax blocks at a
        # time. A byte holds an even column (high nibble) and the next odd one: a sum over columns may take them
        # in any order, so the even weights meet the tokens' even columns in one tensor-core product and the odd
        # in another, and no nibbles are interleaved. The tokens fill a 16-row tile (the rest are zeros).
        row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        token = tl.arange(0, 16)
        block_in_step = tl.arange(0, BLOCKS)
        byte_in_block = tl.arange(0, 32)
        row_ok = row < rows
        token_ok = token < TOKENS
        blocks_per_row = cols // 64
        share = tl.cdiv(blocks_per_row, SPLIT_K)
        first, last = tl.program_id(1) * share, tl.minimum((tl.program_id(1) + 1) * share, blocks_per_row)
        total = tl.zeros((16, BLOCK_N), tl.float32)
        for start in range(first, last, BLOCKS):
            block = start + block_in_step  # (BLOCKS,)
            ok = row_ok[:, None] & (block < last)[None, :]  # (BLOCK_N, BLOCKS)
            byte = tl.load(packed_ptr + (row.to(tl.int64)[:, None, None] * (cols // 2) + block[None, :, None] * 32
                                         + byte_in_block[None, None, :]), mask=ok[:, :, None], other=0).to(tl.int32)
            flat = row.to(tl.int64)[:, None] * blocks_per_row + block[None, :]
            if NESTED:  # an 8-bit code with a float32 scale per OUTER_BLOCK blocks, plus an offset
                code = tl.load(absmax_ptr + flat, mask=ok, other=0).to(tl.int32)
                scale = (tl.load(code2_ptr + code) * tl.load(absmax2_ptr + flat // OUTER_BLOCK, mask=ok, other=0.0)
                         + tl.load(offset_ptr))
            else:
                scale = tl.load(absmax_ptr + flat, mask=ok, other=0.0)
            scale = tl.where(ok, scale, 0.0)[:, :, None]  # weights outside this share or the matrix: zeros
            high = tl.reshape((tl.load(table_ptr + (byte >> 4)) * scale).to(tl.float16), (BLOCK_N, BLOCKS * 32))
            low = tl.reshape((tl.load(table_ptr + (byte & 15)) * scale).to(tl.float16), (BLOCK_N, BLOCKS * 32))
            column = start * 64 + tl.arange(0, BLOCKS * 64)  # the tokens' columns, read whole, split in registers
            x = tl.load(x_ptr + token[:, None] * cols + column[None, :],
                        mask=token_ok[:, None] & (column < last * 64)[None, :], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (16, BLOCKS * 32, 2)))
            total = tl.dot(x_even, tl.trans(high), total)
            total = tl.dot(x_odd, tl.trans(low), total)
        out = out_ptr + token[:, None] * rows + row[None, :]
        tl.atomic_add(out, total, mask=token_ok[:, None] & row_ok[None, :], sem="relaxed")

    return nf4_few_tokens


def kernel_fits(x: torch.Tensor, state) -> bool:
    """Whether `few_token_product` runs our kernel: CUDA with tensor-core products in Triton (compute capability
    8.0 and up: for a T4's 7.5 Triton writes the products as 16 rows of scalar multiply-adds, ~1,000 a thread
    an iteration, for any number of tokens), fp16, 2 to FEW_TOKENS tokens, NF4 in blocks of 64 (bitsandbytes'
    default), whole blocks in a row."""
    tokens = x.shape[:-1].numel()
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0) and x.dtype == torch.float16
            and 2 <= tokens <= FEW_TOKENS and state.quant_type == "nf4"
            and state.blocksize == 64 and state.shape[1] % 64 == 0 and x.shape[-1] == state.shape[1]
            and (not state.nested or state.state2.blocksize == 256))


@torch.library.custom_op("htmlgen::nf4_few_tokens", mutates_args=())
def _nf4_few_tokens(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor,
                    absmax2: torch.Tensor, offset: torch.Tensor, table: torch.Tensor, rows: int,
                    nested: bool) -> torch.Tensor:
    tokens, cols = x.shape[:-1].numel(), x.shape[-1]
    out = torch.zeros((tokens, rows), dtype=torch.float32, device=x.device)
    kernel = _kernel()
    grid = lambda meta: (-(-rows // meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    with torch.cuda.device(x.device):
        kernel[grid](x.reshape(tokens, cols).contiguous(), packed, absmax, code2, absmax2, offset, table, out,
                     rows, cols, TOKENS=tokens, NESTED=nested, OUTER_BLOCK=256)
    return out  # float32: the cast to fp16 is left outside the op, where a compiled step fuses it with what follows


@_nf4_few_tokens.register_fake
def _(x, packed, absmax, code2, absmax2, offset, table, rows, nested):
    return x.new_empty((x.shape[:-1].numel(), rows), dtype=torch.float32)


def kernel_arguments(weight: torch.Tensor, state) -> tuple[torch.Tensor, ...]:
    """The kernel's weight pointers, in its order: packed codes, absmax, the nested absmax's code, its scales and
    offset, and the NF4 table. Without nesting the nested ones are unused: the absmax stands in for them."""
    nested = bool(state.nested)
    absmax = state.absmax
    code2 = state.state2.code if nested else absmax
    absmax2 = state.state2.absmax if nested else absmax
    offset = state.offset.reshape(1) if nested else absmax  # a float32 tensor on the device already
    return weight.view(-1), absmax, code2, absmax2, offset, state.code


def few_token_product(x: torch.Tensor, weight: torch.Tensor, state) -> torch.Tensor:
    """`x` (a few tokens) times a bitsandbytes 4-bit weight: our kernel where it fits, else `bnb.matmul_4bit`."""
    if not kernel_fits(x, state):
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, weight.view(-1, 1), quant_state=state)
    out = _nf4_few_tokens(x, *kernel_arguments(weight, state), state.shape[0], bool(state.nested))
    return out.to(x.dtype).view(*x.shape[:-1], state.shape[0])
