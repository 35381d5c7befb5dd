"""A 4-bit layout made for batch-1 decoding: could a product over it read the weights faster than bitsandbytes?

    PYTHONPATH=$PWD python bench/column_words_matvec.py --out $OUT   # one CUDA GPU with Triton, ~3 minutes

Kernels that read bitsandbytes' NF4 layout as stored (a weight row's codes contiguous, two a byte) met
bitsandbytes' speed and no more, even with the table lookup taken out (bench/RESULTS.md): a kernel that walks a
row in a loop keeps too little memory traffic in flight. Here the same codes are re-laid once
("column words"): eight consecutive codes of a weight row in one 32-bit word (code j in bits 4j..4j+3), the
words of one input position for all outputs contiguous, so that a tile of outputs reads whole cache lines; the
absmax dequantised to float32, laid out the same way. A program takes BLOCK_K inputs of BLOCK_N outputs with no
loop, issues all its loads at once, and adds its share into the float32 output (zeroed before; timed without
the zeroing, which a decode step can do for all layers at once). The lookup is one of:

- `prmt`: four codes at a time from the table's bytes held in registers, with byte permutes (inline PTX,
  `prmt_lookup_asm`): the package's kernel as `decode_one` runs it;
- `table`: each code's NF4 value from a 16-entry float32 table (a load that hits the L1 cache);
- `raw`: the code itself (a wrong product: the cost without any lookup).

All three are the package's kernel (`htmlgen_utils.levers.column_words`), told which lookup to use.

For each stacked 7B matrix (q/k/v, o, gate/up, down) every tile shape is timed once, then bitsandbytes and the
best of each lookup `--repeats` times, interleaved. Times are in CUDA graphs; bytes read per second; every
lookup but `raw` is checked against the dequantised product before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from common import REPO, interleaved_graph_times, random_layer_and_token, versions, write_report

from htmlgen_utils.levers.column_words import _kernel, column_words, prmt_lookup_asm
from htmlgen_utils.levers.stacking import unnested_absmax

SHAPES = {
    "q/k/v stacked": (12288, 4096),
    "o": (4096, 4096),
    "gate/up stacked": (22016, 4096),
    "down": (4096, 11008),
}  # each once a layer
LOOKUPS = ("prmt", "table", "raw")


def layer_column_words(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's NF4 codes as (cols / 8, rows) int32 words and its absmax as (cols / 64, rows) float32."""
    state = layer.weight.quant_state
    return column_words(layer.weight.data, unnested_absmax(state), *state.shape)


def raw_codes_asm() -> str:
    """PTX that gives a word's eight codes themselves, as float32: the kernel without any lookup (a wrong
    product), to show what the layout reads at."""
    lines = ["{", ".reg .b32 s;"]
    for j in range(8):
        lines += [f"shr.u32 s, $8, {4 * j};", "and.b32 s, s, 15;", f"cvt.rn.f32.u32 ${j}, s;"]
    return "\n".join(lines + ["}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--lookups", default=",".join(LOOKUPS))
    parser.add_argument("--quick", action="store_true", help="18 tile shapes instead of 48 (compiles faster)")
    parser.add_argument(
        "--tiles", help='the tiles to sweep instead, as "BLOCK_Ns/BLOCK_Ks/warps", e.g. "512,1024,2048/16,32/4,8"'
    )
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench_cudagraph

    kernel = _kernel()
    report = {**versions(), "rows": {}}
    torch.manual_seed(0)
    tiles = (
        ((128, 256, 512), (32, 64, 128), (2, 4)) if args.quick else ((64, 128, 256, 512), (32, 64, 128, 256), (1, 2, 4))
    )
    if args.tiles:
        tiles = tuple(tuple(int(n) for n in part.split(",")) for part in args.tiles.split("/"))
    lookups = args.lookups.split(",")
    configs = list(itertools.product(*tiles, lookups))
    step = {}
    for name in args.shapes.split(","):
        rows, cols = SHAPES[name]
        layer, x, reference = random_layer_and_token(rows, cols, torch.float16)
        words, absmax = layer_column_words(layer)
        table = layer.weight.quant_state.code.float().contiguous()
        asm = {"prmt": prmt_lookup_asm(table), "table": "", "raw": raw_codes_asm()}
        out = torch.zeros(rows, dtype=torch.float32, device="cuda")
        token = x.reshape(cols)

        def ours(config):
            block_n, block_k, warps, lookup = config
            grid = (triton.cdiv(rows, block_n), cols // block_k)
            return lambda: kernel[grid](
                token,
                words,
                absmax,
                table,
                out,
                rows,
                cols,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                ASM=asm[lookup],
                num_warps=warps,
                num_stages=1,
            )

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
            times = interleaved_graph_times(ways, args.repeats)
        packed = layer.weight.numel() + 4 * absmax.numel()
        row = {
            "best": {k: list(v) for k, v in best.items()},
            "top": sorted(((round(t, 2), list(c)) for c, t in sweep.items()))[:12],
        }
        for way, time in times.items():
            row[way] = {**time, "gb_per_s": round(packed / time["us"] / 1e3)}
            step[way] = step.get(way, 0.0) + 32 * time["us"] / 1e3
        report["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        print("  top", row["top"][:6], flush=True)
        write_report(report, args.out, "column_words_matvec.json", quiet=True)  # a run cut short keeps some
    report["ms_per_7b_step"] = {k: round(v, 3) for k, v in step.items()}  # a decode step's 128 products
    print("ms per 7B step", report["ms_per_7b_step"], flush=True)
    write_report(report, args.out, "column_words_matvec.json")


if __name__ == "__main__":
    main()
