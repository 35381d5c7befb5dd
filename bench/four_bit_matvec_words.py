"""A second try at beating bitsandbytes' 4-bit matrix-vector product: read the NF4 weights four bytes at a time.

    PYTHONPATH=$PWD python bench/four_bit_matvec_words.py --out $OUT   # one CUDA GPU with Triton, ~2 minutes

`four_bit_matvec.py` read bitsandbytes' packed bytes in tiles of bytes and looked each 4-bit code up in the
16-entry NF4 table; it matched bitsandbytes (~1 TB/s) and no more. This kernel loads the same bytes as 32-bit
words (tiles of rows x absmax blocks x 8 words, the words of a row contiguous), optionally splits a row between
programs (`split`: partial sums per split, added afterwards, not timed), and looks a whole byte up at once in a
256-entry table of fp16 pairs (`lookup2`: one load gives both weights of a byte); `lookup0` uses the raw codes
(a wrong product, the cost without any lookup). The token comes as its even and odd values (two contiguous
vectors: inside a compiled step the split would fuse into the kernel that makes the token).

For each 7B matrix shape (and gate and up stacked into one matrix, to see whether a larger product reads
faster) every tile shape of the sweep is timed once, then bitsandbytes and the best of each kind `--repeats`
times, interleaved. Times are in CUDA graphs; bytes read per second; every lookup kernel is checked against
`nf4_matvec` (the product in plain tensor operations) before it is timed.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from common import REPO, interleaved_graph_times, versions, write_report
from four_bit_matvec import random_layer_and_token

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008),
          "gate+up stacked": (22016, 4096)}
PER_LAYER = {"q/k/v/o": 4, "gate/up": 2, "down": 1}


def build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_first_ptr, x_second_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, table_ptr,
               out_ptr, rows, words_per_row, split_words, OUTER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCKS: tl.constexpr, LOOKUP: tl.constexpr):
        # tile: (rows, absmax blocks, 8 words of a block); a word is 4 bytes, a byte two codes, high first.
        # Program (i, j) takes rows i * BLOCK_N ... and the j-th `split_words` of each row.
        row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = row < rows
        row3 = row[:, None, None].to(tl.int64)
        blk = tl.arange(0, BLOCKS)[None, :, None]
        wd = tl.arange(0, 8)[None, None, :]
        byt = tl.arange(0, 4)[None, None, None, :]
        acc = tl.zeros((BLOCK_N, BLOCKS), tl.float32)
        blocks_per_row = words_per_row // 8
        first_word = tl.program_id(1) * split_words
        last_word = tl.minimum(first_word + split_words, words_per_row)
        for start in range(first_word, last_word, BLOCKS * 8):  # start: a word index
            word_index = start + blk * 8 + wd  # (1, B, 8)
            ok = row_ok[:, None, None] & (word_index < last_word)
            word = tl.load(words_ptr + row3 * words_per_row + word_index, mask=ok, other=0)  # (N, B, 8)
            byte_index = word_index[:, :, :, None] * 4 + byt  # (1, B, 8, 4)
            x_ok = byte_index < last_word * 4
            xf = tl.load(x_first_ptr + byte_index, mask=x_ok, other=0.0).to(tl.float32)
            xs = tl.load(x_second_ptr + byte_index, mask=x_ok, other=0.0).to(tl.float32)
            byte = (word[:, :, :, None] >> (byt * 8)) & 255  # (N, B, 8, 4)
            if LOOKUP == 2:
                pair = tl.load(table_ptr + byte)
                first = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                second = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                first, second = (byte >> 4).to(tl.float32), (byte & 15).to(tl.float32)
            partial = tl.sum(tl.sum(first * xf + second * xs, 3), 2)  # (N, B)
            block_index = start // 8 + tl.arange(0, BLOCKS)[None, :]
            flat = row[:, None].to(tl.int64) * blocks_per_row + block_index
            b_ok = row_ok[:, None] & (block_index < last_word // 8)
            code = tl.load(absmax_ptr + flat, mask=b_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + flat // OUTER_BLOCK, mask=b_ok, other=0.0)
            acc += partial * (scale + offset)
        tl.store(out_ptr + tl.program_id(1) * rows + row, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=row_ok)

    return kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench_cudagraph

    kernel = build_kernel()
    dtype = torch.float16
    report = {**versions(), "rows": {}}
    torch.manual_seed(0)
    configs = list(itertools.product((4, 8, 16, 32), (2, 4, 8, 16), (4, 8), (1, 2, 4), (0, 2)))
    step = {}
    for name, (rows, cols) in SHAPES.items():
        layer, x, reference = random_layer_and_token(rows, cols, dtype)
        state = layer.weight.quant_state
        x_first, x_second = x.reshape(-1, 2)[:, 0].contiguous(), x.reshape(-1, 2)[:, 1].contiguous()
        words = layer.weight.data.view(-1).view(torch.int32)
        codes = torch.arange(256, device="cuda")
        hi = state.code[codes >> 4].half().view(torch.int16).int() & 0xFFFF
        lo = state.code[codes & 15].half().view(torch.int16).int() & 0xFFFF
        pair = (hi | (lo << 16)).to(torch.int32)
        out = torch.zeros(4, rows, dtype=torch.float32, device="cuda")

        def ours(config):
            block_n, blocks, warps, split, lookup = config
            split_words = triton.cdiv(cols // 8, split * blocks * 8) * blocks * 8
            arguments = (x_first, x_second, words, state.absmax, state.state2.code, state.state2.absmax,
                         float(state.offset), pair, out, rows, cols // 8, split_words)  # lookup 0 reads no table
            grid = (triton.cdiv(rows, block_n), triton.cdiv(cols // 8, split_words))
            return lambda: kernel[grid](*arguments, OUTER_BLOCK=state.state2.blocksize, BLOCK_N=block_n,
                                        BLOCKS=blocks, LOOKUP=lookup, num_warps=warps)

        sweep = {}
        with torch.no_grad():
            for config in configs:
                try:
                    run = ours(config)
                    out.zero_()
                    run()
                    if config[-1]:
                        error = ((out.sum(0) - reference).abs().max() / reference.abs().max()).item()
                        assert error < 5e-3, (config, error)
                    sweep[config] = do_bench_cudagraph(run, rep=5) * 1e3
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    print("skip", config, type(exc).__name__, str(exc)[:200], flush=True)
            best = {lookup: min((c for c in sweep if c[-1] == lookup), key=sweep.get) for lookup in (0, 2)}
            ways = {"bitsandbytes": lambda: layer(x), **{f"lookup{lookup}": ours(best[lookup]) for lookup in best}}
            times = interleaved_graph_times(ways, args.repeats)
        packed = layer.weight.numel() + state.absmax.numel()
        row = {"best": {k: list(v) for k, v in best.items()},
               "top": sorted(((round(t, 2), list(c)) for c, t in sweep.items()))[:12]}
        for way, time in times.items():
            row[way] = {**time, "gb_per_s": round(packed / time["us"] / 1e3)}
            if name in PER_LAYER:
                step[way] = step.get(way, 0.0) + 32 * PER_LAYER[name] * time["us"] / 1e3
        report["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        print("  top", row["top"][:6], flush=True)
    report["ms_per_7b_step"] = {k: round(v, 3) for k, v in step.items()}  # the 224 products of a decode step
    write_report(report, args.out, "four_bit_matvec_words.json")


if __name__ == "__main__":
    main()
