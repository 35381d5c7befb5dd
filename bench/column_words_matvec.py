"""A 4-bit layout made for batch-1 decoding: could a product over it read the weights faster than bitsandbytes?

    PYTHONPATH=$PWD python bench/column_words_matvec.py --out $OUT   # one CUDA GPU with Triton, ~3 minutes

`four_bit_matvec.py` and `four_bit_matvec_words.py` read bitsandbytes' NF4 layout as stored (a weight row's
codes contiguous, two a byte) and met bitsandbytes' ~1 TB/s, even with the table lookup taken out: a kernel
that walks a row in a loop keeps too little memory traffic in flight. Here the same codes are re-laid once
("column words"): eight consecutive codes of a weight row in one 32-bit word (code j in bits 4j..4j+3), the
words of one input position for all outputs contiguous, so that a tile of outputs reads whole cache lines; the
absmax dequantised to float32, laid out the same way. A program takes BLOCK_K inputs of BLOCK_N outputs with no
loop, issues all its loads at once, and adds its share into the float32 output (zeroed before; timed without
the zeroing, which a decode step can do for all layers at once). The lookup is one of:

- `table`: each code's NF4 value from a 16-entry float32 table (a load that hits the L1 cache);
- `pairs`: each byte's two values from a 256-entry table of fp16 pairs (half the loads);
- `prmt`: four codes at a time from the table's bytes held in registers, with byte permutes (inline PTX,
  `htmlgen_utils.levers.column_words.prmt_lookup_asm`; the package's kernel is this one with that lookup);
- `raw`: the code itself (a wrong product: the cost without any lookup).

For each stacked 7B matrix (q/k/v, o, gate/up, down) every tile shape is timed once, then bitsandbytes and the
best of each lookup `--repeats` times, interleaved. Times are in CUDA graphs; bytes read per second; every
lookup but `raw` is checked against `nf4_matvec` before it is timed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from common import REPO, versions, write_report
from four_bit_matvec import random_layer_and_token

from htmlgen_utils.levers.column_words import column_words, prmt_lookup_asm
from htmlgen_utils.levers.stacking import unnested_absmax

SHAPES = {"q/k/v stacked": (12288, 4096), "o": (4096, 4096), "gate/up stacked": (22016, 4096),
          "down": (4096, 11008)}  # each once a layer
LOOKUPS = {"raw": 0, "table": 1, "pairs": 2, "prmt": 3}


def layer_column_words(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's NF4 codes as (cols / 8, rows) int32 words and its absmax as (cols / 64, rows) float32."""
    state = layer.weight.quant_state
    return column_words(layer.weight.data, unnested_absmax(state), *state.shape)


def build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, words_ptr, absmax_ptr, table_ptr, pairs_ptr, out_ptr, rows,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr, ASM: tl.constexpr):
        # a program: outputs n, inputs [k0, k0 + BLOCK_K); a word holds inputs 8w .. 8w + 7 of one output
        WORDS: tl.constexpr = BLOCK_K // 8
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < rows
        word_row = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
        word = tl.load(words_ptr + word_row.to(tl.int64)[:, None] * rows + n[None, :], mask=n_ok[None, :], other=0)
        acc = tl.zeros((WORDS, BLOCK_N), tl.float32)
        if LOOKUP == 3:  # byte permutes in registers
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            x = x_ptr + word_row * 8
            acc += (v0 * tl.load(x).to(tl.float32)[:, None] + v1 * tl.load(x + 1).to(tl.float32)[:, None]
                    + v2 * tl.load(x + 2).to(tl.float32)[:, None] + v3 * tl.load(x + 3).to(tl.float32)[:, None]
                    + v4 * tl.load(x + 4).to(tl.float32)[:, None] + v5 * tl.load(x + 5).to(tl.float32)[:, None]
                    + v6 * tl.load(x + 6).to(tl.float32)[:, None] + v7 * tl.load(x + 7).to(tl.float32)[:, None])
        elif LOOKUP == 2:
            for j in tl.static_range(4):  # byte j: inputs 8w + 2j (low nibble) and 8w + 2j + 1 (high)
                pair = tl.load(pairs_ptr + ((word >> (8 * j)) & 255))
                low = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                high = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                x_low = tl.load(x_ptr + word_row * 8 + 2 * j).to(tl.float32)
                x_high = tl.load(x_ptr + word_row * 8 + 2 * j + 1).to(tl.float32)
                acc += low * x_low[:, None] + high * x_high[:, None]
        else:
            for j in tl.static_range(8):
                code = (word >> (4 * j)) & 15
                value = tl.load(table_ptr + code) if LOOKUP == 1 else code.to(tl.float32)
                acc += value * tl.load(x_ptr + word_row * 8 + j).to(tl.float32)[:, None]
        if BLOCK_K >= 64:  # several absmax blocks: scale each block's sum
            GROUPS: tl.constexpr = BLOCK_K // 64
            group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
            scale = tl.load(absmax_ptr + group.to(tl.int64)[:, None] * rows + n[None, :], mask=n_ok[None, :],
                            other=0.0)
            total = tl.sum(tl.sum(tl.reshape(acc, (GROUPS, 8, BLOCK_N)), 1) * scale, 0)
        else:
            group = (tl.program_id(1) * BLOCK_K) // 64
            total = tl.sum(acc, 0) * tl.load(absmax_ptr + group.to(tl.int64) * rows + n, mask=n_ok, other=0.0)
        tl.atomic_add(out_ptr + n, total, mask=n_ok, sem="relaxed")

    return kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--lookups", default=",".join(LOOKUPS))
    parser.add_argument("--quick", action="store_true", help="36 tile shapes instead of 144 (compiles faster)")
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench_cudagraph

    kernel = build_kernel()
    dtype = torch.float16
    report = {**versions(), "rows": {}}
    torch.manual_seed(0)
    tiles = ((128, 256, 512), (32, 64, 128), (2, 4)) if args.quick else ((64, 128, 256, 512), (32, 64, 128, 256),
                                                                        (1, 2, 4))
    lookups = args.lookups.split(",")
    configs = list(itertools.product(*tiles, lookups))
    step = {}
    for name in args.shapes.split(","):
        rows, cols = SHAPES[name]
        layer, x, reference = random_layer_and_token(rows, cols, dtype)
        words, absmax = layer_column_words(layer)
        table = layer.weight.quant_state.code.float().contiguous()
        codes = torch.arange(256, device="cuda")
        low = table[codes & 15].half().view(torch.int16).int() & 0xFFFF
        high = table[codes >> 4].half().view(torch.int16).int() & 0xFFFF
        pairs = (low | (high << 16)).to(torch.int32)
        out = torch.zeros(rows, dtype=torch.float32, device="cuda")
        token = x.reshape(cols)
        asm = prmt_lookup_asm(table)

        def ours(config):
            block_n, block_k, warps, lookup = config
            grid = (triton.cdiv(rows, block_n), cols // block_k)
            return lambda: kernel[grid](token, words, absmax, table, pairs, out, rows, BLOCK_N=block_n,
                                        BLOCK_K=block_k, LOOKUP=LOOKUPS[lookup], ASM=asm, num_warps=warps,
                                        num_stages=1)

        sweep = {}
        with torch.no_grad():
            for config in configs:
                if cols % config[1]:
                    continue
                try:
                    run = ours(config)
                    out.zero_()
                    run()
                    if config[-1] != "raw":
                        error = ((out - reference).abs().max() / reference.abs().max()).item()
                        assert error < 5e-3, (config, error)
                    sweep[config] = do_bench_cudagraph(run, rep=5) * 1e3
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    print("skip", config, type(exc).__name__, str(exc)[:200], flush=True)
            best = {lookup: min((c for c in sweep if c[-1] == lookup), key=sweep.get) for lookup in lookups}
            ways = {"bitsandbytes": lambda: layer(x), **{lookup: ours(best[lookup]) for lookup in best}}
            times = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way, run in ways.items():
                    times[way].append(do_bench_cudagraph(run, rep=40) * 1e3)
        packed = layer.weight.numel() + 4 * absmax.numel()
        row = {"best": {k: list(v) for k, v in best.items()},
               "top": sorted(((round(t, 2), list(c)) for c, t in sweep.items()))[:12]}
        for way, values in times.items():
            median = statistics.median(values)
            row[way] = {"us": round(median, 2), "min": round(min(values), 2), "max": round(max(values), 2),
                        "gb_per_s": round(packed / median / 1e3)}
            step[way] = step.get(way, 0.0) + 32 * median / 1e3
        report["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        print("  top", row["top"][:6], flush=True)
        write_report(report, args.out, "column_words_matvec.json", quiet=True)  # a run cut short keeps some
    report["ms_per_7b_step"] = {k: round(v, 3) for k, v in step.items()}  # a decode step's 128 products
    print("ms per 7B step", report["ms_per_7b_step"], flush=True)
    write_report(report, args.out, "column_words_matvec.json")


if __name__ == "__main__":
    main()
