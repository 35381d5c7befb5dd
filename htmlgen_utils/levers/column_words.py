"""A 4-bit layout made for batch-1 decoding: the same NF4 codes, laid out so one token's product reads fast.

Batch-1 decoding reads every 4-bit weight once a token, and bitsandbytes' matrix-vector kernel reads its own
layout at a fraction of the memory's speed. Here a stacked group's codes are laid out once more, for decoding
alone ("column words"): eight consecutive codes of one output's weight row in a 32-bit word (code j in bits
4j..4j+3), the words of one input position for all outputs contiguous, so a tile of outputs reads whole cache
lines; the absmax as float32, laid out the same way. A program takes `BLOCK_K` inputs of `BLOCK_N` outputs with no
loop, so all its loads are in flight at once, and adds its share into a float32 output (zeroed before a step).

On CUDA the codes are looked up in registers (`prmt_lookup_asm`: byte permutes over the table's 16 fp16 values);
a load from a table per code was slower than bitsandbytes. Triton's CPU interpreter cannot run PTX, so there
the kernel loads from the table, the same sums; on CPU the op itself is those sums in tensor operations.

The same weights; the product to fp16 rounding of the table's values. The price is memory: the copy is as large
as the 4-bit weights, kept beside them because prompts and training read bitsandbytes' layout.
"""

from __future__ import annotations

import functools

import torch

WORD_CODES = 8  # 4-bit codes a 32-bit word holds


def column_words(
    packed: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, codes_at_once: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' packed NF4 bytes of a (rows, cols) weight (two codes a byte, the first in the high nibble)
    and its float32 absmax (one per 64 weights of a row) as (cols / 8, rows) int32 words and (cols / 64, rows)
    float32 scales. Rows are re-laid a slice at a time (`codes_at_once` codes: 64 MB of int32 working memory),
    so a 7B model's largest stacked matrix needs no 360 MB of it at once."""
    packed = packed.reshape(rows, cols // 2)
    words = torch.empty(cols // WORD_CODES, rows, dtype=torch.int32, device=packed.device)
    step = max(1, codes_at_once // cols)
    for start in range(0, rows, step):
        part = packed[start : start + step]
        codes = torch.stack([part >> 4, part & 15], -1).view(-1, cols // WORD_CODES, WORD_CODES).int()
        word = codes[..., 0].clone()
        for j in range(1, WORD_CODES):
            word |= codes[..., j] << (4 * j)
        words[:, start : start + step] = word.t()
    return words, absmax.float().reshape(rows, cols // 64).t().contiguous()


def column_words_bytes(state) -> int:
    """GPU memory the layout of a weight with this quant state takes: its codes and its float32 absmax."""
    return state.shape.numel() // 2 + 4 * (state.shape.numel() // state.blocksize)


def prmt_lookup_asm(table: torch.Tensor) -> str:
    """PTX that turns one word's eight 4-bit codes into their `table` values (as fp16, returned as float32)
    without a memory access. The table's 16 fp16 values are split into their low and high bytes, four registers
    each; `prmt` (byte permute) picks four bytes at once from an 8-entry half by the low three bits of four
    codes, a mask made from each code's fourth bit (a `prmt` that replicates a byte's sign) chooses the half
    (`lop3`), and two more `prmt`s pair each value's low and high byte. ~29 instructions for eight weights."""
    bits = [int(b) & 0xFFFF for b in table.half().view(torch.int16).tolist()]

    def four_bytes(values: list[int]) -> int:  # the first lowest
        return sum(value << (8 * i) for i, value in enumerate(values))

    low = [four_bytes([b & 0xFF for b in bits[i : i + 4]]) for i in range(0, 16, 4)]
    high = [four_bytes([b >> 8 for b in bits[i : i + 4]]) for i in range(0, 16, 4)]
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, t3, t4, t5, t6, t7, w4, s, la, lb, ha, hb, m, lo, hi, p, c;",
        ".reg .b16 h0, h1;",
    ]
    lines += [f"mov.b32 t{i}, {value:#x};" for i, value in enumerate(low + high)]  # the word is $8
    lines += ["shl.b32 w4, $8, 4;"]  # each even code's fourth bit moved to the top of a byte, as the odd ones are
    for half, (shift, mask_select) in enumerate(((0, 0xD9C8), (16, 0xFBEA))):  # codes 0-3, then 4-7
        lines += [
            f"shr.u32 s, $8, {shift};",
            "and.b32 s, s, 0x7777;",  # four codes' low three bits
            "prmt.b32 la, t0, t1, s;",
            "prmt.b32 lb, t2, t3, s;",  # low bytes of values 0-7 and 8-15
            "prmt.b32 ha, t4, t5, s;",
            "prmt.b32 hb, t6, t7, s;",  # high bytes
            f"mov.b32 c, {mask_select:#x};",
            "prmt.b32 m, w4, $8, c;",  # byte i 0xFF where code i >= 8
            "lop3.b32 lo, la, lb, m, 0xD8;",
            "lop3.b32 hi, ha, hb, m, 0xD8;",
        ]  # (la & ~m) | (lb & m)
        for pair, select in enumerate((0x5140, 0x7362)):  # codes 0 and 1 (low byte, high byte each), 2 and 3
            first = 4 * half + 2 * pair
            lines += [
                f"mov.b32 c, {select:#x};",
                "prmt.b32 p, lo, hi, c;",
                "mov.b32 {h0, h1}, p;",
                f"cvt.f32.f16 ${first}, h0;",
                f"cvt.f32.f16 ${first + 1}, h1;",
            ]
    return "\n".join(lines + ["}"])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_column_words(
        x_ptr,
        words_ptr,
        absmax_ptr,
        table_ptr,
        out_ptr,
        rows,
        cols,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ASM: tl.constexpr,
    ):
        # a program: outputs n over inputs [k0, k0 + BLOCK_K); word row w holds inputs 8w .. 8w + 7. `cols`
        # (the inputs; the grid covers them) is an argument for the autotuner's key. ASM: the lookup in
        # registers (`prmt_lookup_asm`), or "" for loads from the table (Triton's interpreter)
        WORDS: tl.constexpr = BLOCK_K // 8
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < rows
        word_row = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
        word = tl.load(words_ptr + word_row.to(tl.int64)[:, None] * rows + n[None, :], mask=n_ok[None, :], other=0)
        x = x_ptr + word_row * 8
        if ASM != "":
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 8, is_pure=True, pack=1
            )
        else:
            v0, v1 = tl.load(table_ptr + (word & 15)), tl.load(table_ptr + ((word >> 4) & 15))
            v2, v3 = tl.load(table_ptr + ((word >> 8) & 15)), tl.load(table_ptr + ((word >> 12) & 15))
            v4, v5 = tl.load(table_ptr + ((word >> 16) & 15)), tl.load(table_ptr + ((word >> 20) & 15))
            v6, v7 = tl.load(table_ptr + ((word >> 24) & 15)), tl.load(table_ptr + ((word >> 28) & 15))
        acc = (
            v0 * tl.load(x).to(tl.float32)[:, None]
            + v1 * tl.load(x + 1).to(tl.float32)[:, None]
            + v2 * tl.load(x + 2).to(tl.float32)[:, None]
            + v3 * tl.load(x + 3).to(tl.float32)[:, None]
            + v4 * tl.load(x + 4).to(tl.float32)[:, None]
            + v5 * tl.load(x + 5).to(tl.float32)[:, None]
            + v6 * tl.load(x + 6).to(tl.float32)[:, None]
            + v7 * tl.load(x + 7).to(tl.float32)[:, None]
        )
        if BLOCK_K >= 64:  # several absmax blocks: scale each block's sum
            GROUPS: tl.constexpr = BLOCK_K // 64
            group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
            scale = tl.load(absmax_ptr + group.to(tl.int64)[:, None] * rows + n[None, :], mask=n_ok[None, :], other=0.0)
            total = tl.sum(tl.sum(tl.reshape(acc, (GROUPS, 8, BLOCK_N)), 1) * scale, 0)
        else:
            group = (tl.program_id(1) * BLOCK_K) // 64
            total = tl.sum(acc, 0) * tl.load(absmax_ptr + group.to(tl.int64) * rows + n, mask=n_ok, other=0.0)
        tl.atomic_add(out_ptr + n, total, mask=n_ok, sem="relaxed")

    return nf4_column_words


# (BLOCK_N, BLOCK_K, warps): the fastest tiles of the 7B shapes, their neighbours, and deeper tiles (fewer atomic
# adds an output) for GPUs where those cost more; Triton's autotuner times them once a matrix shape
CONFIGS = ((512, 32, 2), (512, 32, 4), (256, 32, 2), (512, 64, 2), (1024, 32, 4), (1024, 32, 8), (512, 16, 2),
           (512, 64, 4), (256, 128, 4))  # fmt: skip


def tiles_for(cols: int) -> list[tuple[int, int, int]]:
    """The tiles that cover `cols` inputs exactly: a program reads `BLOCK_K` inputs unmasked, so a tile whose
    `BLOCK_K` does not divide `cols` would drop the last inputs (704 = 11 x 64 is no multiple of 128)."""
    return [tile for tile in CONFIGS if cols % tile[1] == 0]


def grid(rows: int, cols: int, block_n: int, block_k: int) -> tuple[int, int]:
    return -(-rows // block_n), cols // block_k


@functools.cache
def _tuned():
    import triton

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1) for n, k, w in CONFIGS]

    def covering(configs, named_args, **kwargs):
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) in
                tiles_for(named_args["cols"])]  # fmt: skip

    return triton.autotune(
        configs=configs,
        key=["rows", "cols"],
        reset_to_zero=["out_ptr"],
        prune_configs_by={"early_config_prune": covering},
    )(_kernel())


@torch.library.custom_op("htmlgen::nf4_column_words_add", mutates_args=("out",))
def _nf4_column_words_add(
    out: torch.Tensor, x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, asm: str
) -> None:
    # adds the product into `out` (float32, zeroed by the caller): the kernel's programs each add their share,
    # and zeroing every group's output in one kernel (`zero_outputs`) saves a fill kernel a product
    cols, rows = words.shape[0] * WORD_CODES, words.shape[1]
    with torch.cuda.device(x.device):
        _tuned()[lambda meta: grid(rows, cols, meta["BLOCK_N"], meta["BLOCK_K"])](
            x.reshape(cols).contiguous(), words, absmax, table, out, rows, cols, ASM=asm
        )


@_nf4_column_words_add.register_kernel("cpu")
def _(out, x, words, absmax, table, asm):
    # the same product in tensor operations, for CPU (where the layout is only ever tested): each word's eight
    # codes unpacked, looked up, scaled by their block's absmax, and summed against the token
    cols, rows = words.shape[0] * WORD_CODES, words.shape[1]
    shifts = torch.arange(0, 4 * WORD_CODES, 4, dtype=torch.int32, device=words.device)
    codes = ((words.unsqueeze(1) >> shifts[None, :, None]) & 15).reshape(cols, rows)
    weights = table[codes.long()] * absmax.repeat_interleave(64, 0)
    out.add_(x.reshape(cols).float() @ weights)


class ColumnWords:
    """A (stacked) NF4 weight in the column-words layout, and the product of one token with it."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, state) -> None:
        rows, cols = state.shape
        self.words, self.absmax = column_words(packed, absmax, rows, cols)
        self.table, self.rows = state.code.float(), rows
        self.asm = prmt_lookup_asm(self.table)  # made here, once: it reads the table back to the host
        self.out = torch.zeros(rows, dtype=torch.float32, device=packed.device)  # the product adds into it

    @staticmethod
    def fits(packed: torch.Tensor, state) -> bool:
        """Built for CUDA only (elsewhere the product is plain tensor operations, for tests), and for
        `fits_format`."""
        return packed.is_cuda and ColumnWords.fits_format(state)

    @staticmethod
    def fits_format(state) -> bool:
        """NF4 in blocks of 64 (bitsandbytes' default), rows of whole blocks."""
        return state.quant_type == "nf4" and state.blocksize == 64 and state.shape[1] % 64 == 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """One token `x` (..., cols) times the weight, as (..., rows) in float32: the layout's own output
        buffer, which must have been zeroed since its last product (`zero_outputs`) and is overwritten by the
        next."""
        _nf4_column_words_add(self.out, x, self.words, self.absmax, self.table, self.asm)
        return self.out.view(*x.shape[:-1], self.rows)


def zero_outputs(layouts: list[ColumnWords]) -> None:
    """Zero the output buffers of all these layouts' products, for the next step: one kernel for all of them
    (instead of a fill each, one kernel a layout, and the gaps between them)."""
    if layouts:
        torch._foreach_zero_([layout.out for layout in layouts])
