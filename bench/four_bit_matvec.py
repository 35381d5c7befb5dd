"""Can our own kernel beat bitsandbytes at batch-1 decoding's main cost, one token times a 4-bit matrix?

    PYTHONPATH=$PWD python bench/four_bit_matvec.py --out $OUT      # one CUDA GPU with Triton, ~1 minute

On the 7B shape, bitsandbytes' matrix-vector kernel (`gemm_4bit_simt`) is 3.6 ms of a 5.4 ms decode step
(bench/README.md), reading the packed weights at ~1 TB/s. This tries the obvious alternative, a Triton kernel
that reads bitsandbytes' NF4 layout as it is (two 4-bit codes a byte, the first in the high nibble; one absmax
per 64 weights, itself an 8-bit code with a float32 scale per 256 blocks) and does the lookup, scaling,
multiply and sum in registers. It is an experiment, not a lever: `htmlgen_utils` does not use it.

For each of a 7B layer's matrix shapes: bitsandbytes; our kernel at the best of a few tile shapes; and the same
kernel with the NF4 table lookup replaced by the raw code (a wrong product, timed to show what the lookup costs).
Times are in CUDA graphs (triton's `do_bench_cudagraph`, so launch overhead is out, as in `DecodeStep`), the
median of `--repeats` rounds with the ways interleaved; bytes read per second; the largest difference from
`nf4_matvec` (the product in plain tensor operations, checked against bitsandbytes' dequantised weight).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import REPO, versions, write_report

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
PER_LAYER = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
TILES = [(32, 64, 8), (64, 64, 8), (32, 64, 16), (64, 64, 16), (32, 128, 8)]  # rows, bytes, parts of a row


def nf4_matvec(x: torch.Tensor, layer) -> torch.Tensor:
    """One token `x` times the layer's NF4 weight, in float32 tensor operations."""
    state = layer.weight.quant_state
    rows, cols = state.shape
    codes = layer.weight.data.view(rows, cols // 64, 32)
    token = x.reshape(cols // 64, 32, 2).float()
    first, second = state.code[(codes >> 4).long()], state.code[(codes & 15).long()]
    outer = state.state2
    index = torch.arange(state.absmax.numel(), device=x.device) // outer.blocksize
    scale = (outer.code[state.absmax.long()] * outer.absmax[index] + state.offset).view(rows, cols // 64, 1)
    return ((first * token[..., 0] + second * token[..., 1]) * scale).sum((1, 2))


def random_layer_and_token(rows: int, cols: int, dtype: torch.dtype):
    """A bitsandbytes NF4 layer (double-quantised, as the model loads them) of random weights on the GPU, a
    random token for it, and their product by `nf4_matvec`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=dtype) * 0.02, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.cuda()
    x = torch.randn(1, 1, cols, dtype=dtype, device="cuda")
    return layer, x, nf4_matvec(x, layer)


def build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, table_ptr, out_ptr, rows, half_cols,
               OUTER_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BYTES: tl.constexpr, PARTS: tl.constexpr,
               LOOKUP: tl.constexpr):
        # a tile is (rows, blocks, 32 bytes): 32 bytes are a block of 64 weights, sharing one absmax
        row = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))[:, None, None]
        block = tl.arange(0, BLOCK_BYTES // 32)[None, :, None]
        byte_in_block = tl.arange(0, 32)[None, None, :]
        row_ok = row < rows
        blocks_per_row = half_cols // 32
        total = tl.zeros((BLOCK_ROWS, BLOCK_BYTES // 32, 32), tl.float32)
        part = tl.cdiv(tl.cdiv(half_cols, PARTS), BLOCK_BYTES) * BLOCK_BYTES  # program_id(1) takes this part of a row
        for start in range(tl.program_id(1) * part, tl.minimum((tl.program_id(1) + 1) * part, half_cols), BLOCK_BYTES):
            byte_index = start + block * 32 + byte_in_block
            byte = tl.load(packed_ptr + row.to(tl.int64) * half_cols + byte_index,
                           mask=row_ok & (byte_index < half_cols), other=0).to(tl.int32)
            if LOOKUP:
                first, second = tl.load(table_ptr + (byte >> 4)), tl.load(table_ptr + (byte & 15))
            else:  # the raw codes: a wrong product, to time the kernel without its lookups
                first, second = (byte >> 4).to(tl.float32), (byte & 15).to(tl.float32)
            value_index = 2 * start + tl.arange(0, 2 * BLOCK_BYTES)  # the token's values as one contiguous load
            values = tl.load(x_ptr + value_index, mask=value_index < 2 * half_cols, other=0.0).to(tl.float32)
            x_first, x_second = tl.split(tl.reshape(values, (1, BLOCK_BYTES // 32, 32, 2)))
            flat = row.to(tl.int64) * blocks_per_row + start // 32 + block
            block_ok = row_ok & (start // 32 + block < blocks_per_row)
            code = tl.load(absmax_ptr + flat, mask=block_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + flat // OUTER_BLOCK, mask=block_ok, other=0.0)
            total += (first * x_first + second * x_second) * (scale + offset)
        tl.store(out_ptr + tl.program_id(1) * rows + row, tl.sum(tl.sum(total, 2), 1)[:, None, None], mask=row_ok)

    return kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import bitsandbytes as bnb
    import triton
    from triton.testing import do_bench_cudagraph

    kernel = build_kernel()
    dtype = torch.float16  # the compute dtype on a T4
    report = {**versions(), "repeats": args.repeats, "rows": {}}
    step_ms: dict[str, float] = {}
    torch.manual_seed(0)
    for name, (rows, cols) in SHAPES.items():
        layer, x, reference = random_layer_and_token(rows, cols, dtype)
        state = layer.weight.quant_state
        dequantised = x.float().reshape(-1) @ bnb.functional.dequantize_4bit(layer.weight.data, state).float().T
        assert (reference - dequantised).abs().max() <= 2e-3 * dequantised.abs().max()  # its weights are fp16

        def ours(tile, lookup: bool):
            block_rows, block_bytes, parts = tile
            out = torch.empty(parts, rows, device="cuda")
            arguments = (x, layer.weight.data, state.absmax, state.state2.code, state.state2.absmax,
                         float(state.offset), state.code, out, rows, cols // 2)
            grid = (triton.cdiv(rows, block_rows), parts)
            return lambda: (kernel[grid](*arguments, OUTER_BLOCK=state.state2.blocksize, BLOCK_ROWS=block_rows,
                                         BLOCK_BYTES=block_bytes, PARTS=parts, LOOKUP=lookup, num_warps=4), out)[1]

        with torch.no_grad():
            best = {lookup: min(TILES, key=lambda tile: do_bench_cudagraph(ours(tile, lookup), rep=20))
                    for lookup in (True, False)}
            ways = {"bitsandbytes": lambda: layer(x), "ours": ours(best[True], True),
                    "ours without the lookup (wrong product)": ours(best[False], False)}
            error = ((ways["ours"]().sum(0) - reference).abs().max() / reference.abs().max()).item()
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.repeats):  # interleaved
                for way, run in ways.items():
                    times[way].append(do_bench_cudagraph(run, rep=50) * 1e3)
        packed_bytes = layer.weight.numel() + state.absmax.numel()
        row = {"packed_mb": round(packed_bytes / 1e6, 1), "ours_relative_max_difference": round(error, 7),
               "ours_tile": dict(zip(("rows", "bytes", "parts"), best[True]))}
        for way, values in times.items():
            median = statistics.median(values)
            row[way] = {"us": round(median, 1), "us_min": round(min(values), 1), "us_max": round(max(values), 1),
                        "gb_per_s": round(packed_bytes / median / 1e3)}
            step_ms[way] = step_ms.get(way, 0.0) + 32 * PER_LAYER[name] * median / 1e3
        report["rows"][name] = row
        print(name, row, flush=True)
    report["ms_per_7b_decode_step"] = {way: round(ms, 2) for way, ms in step_ms.items()}
    write_report(report, args.out, "four_bit_matvec.json")


if __name__ == "__main__":
    main()
