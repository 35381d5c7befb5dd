"""What a 4-bit product costs for a few tokens at once: the price of checking a draft in one decode step.

    PYTHONPATH=$PWD python bench/few_token_products.py --out $OUT      # one CUDA GPU, ~1 minute

Batch-1 decoding reads every 4-bit weight once a token (bench/README.md: 3.7 ms of a ~5.3 ms 7B step). A step
that checks a drafted continuation runs the same weights over a few tokens; bitsandbytes (>= 0.50) multiplies up
to a few tokens with its fused 4-bit kernel, reading the weights once. This times `bnb.matmul_4bit` on a 7B
layer's products (q/k/v and gate/up stacked with unnested absmax, as `levers/stacking.py` lays them; o and down
as loaded, double-quantised) for 1 to 8 tokens, in CUDA graphs, `--repeats` rounds interleaved; the per-step
figure is 32 layers of all four. `ours` is `levers/few_tokens.py`'s kernel (2 tokens and up), which reads each
weight once for all the tokens and multiplies them on the tensor cores, timed in the same rounds.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

from common import REPO, versions, write_report

# name: (rows, columns, unnested absmax as the stacked groups keep it)
PRODUCTS = {"q/k/v stacked": (12288, 4096, True), "o": (4096, 4096, False),
            "gate/up stacked": (22016, 4096, True), "down": (4096, 11008, False)}


def four_bit_weight(rows: int, cols: int, unnested: bool):
    """Random NF4 weights (double-quantised, as the model loads them) and the quant state a product uses."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    from htmlgen_utils.levers.stacking import unnested_absmax

    weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=torch.float16) * 0.02, requires_grad=False,
                               quant_type="nf4", compress_statistics=True).cuda()
    state = weight.quant_state
    if unnested:
        state = QuantState(absmax=unnested_absmax(state), shape=state.shape, code=state.code,
                           blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    return weight.data.view(-1, 1), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", default="1,2,3,4,5,6,8")
    parser.add_argument("--ways", default="bitsandbytes,ours")
    parser.add_argument("--sweep", type=int, default=0, metavar="TOKENS",
                        help="time our kernel alone in each of its tuned configurations for TOKENS tokens")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    import bitsandbytes as bnb
    from triton.testing import do_bench_cudagraph

    from htmlgen_utils.levers.few_tokens import few_token_product

    counts = [int(n) for n in args.tokens.split(",")]
    report = {**versions(), "repeats": args.repeats, "device": torch.cuda.get_device_name(), "products": {}}
    ways = {"bitsandbytes": lambda x, w, s: bnb.matmul_4bit(x, w, s), "ours": few_token_product}
    ways = {way: ways[way] for way in args.ways.split(",")}
    rows_of = [(way, n) for n in counts for way in ways if way == "bitsandbytes" or n > 1]
    step_us = {key: [0.0] * args.repeats for key in rows_of}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (rows, cols, unnested) in PRODUCTS.items():
            weight, state = four_bit_weight(rows, cols, unnested)
            inputs = {n: torch.randn(1, n, cols, dtype=torch.float16, device="cuda") for n in counts}
            errors = {}
            for way, n in rows_of:  # each few-token product equals the one-token products
                x = inputs[n]
                one_by_one = torch.cat([bnb.matmul_4bit(x[:, i:i + 1], weight, state) for i in range(n)], 1)
                difference = (ways[way](x, weight, state) - one_by_one).abs().max().item()
                errors[f"{way} {n}"] = round(difference / one_by_one.abs().max().item(), 6)
                assert difference <= 2e-2 * one_by_one.abs().max().item(), (name, way, n, difference)
            times: dict[tuple, list[float]] = {key: [] for key in rows_of}
            for round_ in range(args.repeats):  # interleaved
                for way, n in rows_of:
                    run = functools.partial(ways[way], inputs[n], weight, state)
                    us = do_bench_cudagraph(run, rep=50) * 1e3
                    times[(way, n)].append(us)
                    step_us[(way, n)][round_] += 32 * us
            report["products"][name] = {f"{way} {n}": {"us": round(statistics.median(t), 2),
                                                       "us_min": round(min(t), 2), "us_max": round(max(t), 2)}
                                        for (way, n), t in times.items()}
            report["products"][name]["relative_difference"] = errors
            print(name, report["products"][name], flush=True)
    one = statistics.median(step_us[("bitsandbytes", counts[0])])
    report["ms_per_7b_step"] = {f"{way} {n}": {"ms": round(statistics.median(t) / 1e3, 3),
                                               "ms_min": round(min(t) / 1e3, 3), "ms_max": round(max(t) / 1e3, 3),
                                               "vs_bitsandbytes_one_token": round(statistics.median(t) / one, 3)}
                                for (way, n), t in step_us.items()}
    print(report["ms_per_7b_step"], flush=True)
    write_report(report, args.out, "few_token_products.json")


def name_of(config) -> str:
    """rows x absmax blocks x column splits x warps of a configuration."""
    n, b, k = (config.kwargs[key] for key in ("BLOCK_N", "BLOCKS", "SPLIT_K"))
    return f"{n}x{b}x{k}x{config.num_warps}"


def kernel_us(kernel, pointers: tuple, rows: int, cols: int, nested: bool, config, tokens: int) -> float:
    """Microseconds of one launch of our kernel (no autotuner) in `config`, in a CUDA graph."""
    from triton.testing import do_bench_cudagraph

    grid = (-(-rows // config.kwargs["BLOCK_N"]), config.kwargs["SPLIT_K"])
    launch = functools.partial(kernel[grid], *pointers, rows, cols, TOKENS=tokens, NESTED=nested, OUTER_BLOCK=256,
                               **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return round(do_bench_cudagraph(launch, rep=20) * 1e3, 2)


def sweep(args) -> None:
    """Our kernel alone (no zeroed output, no cast) in each tuned configuration for `args.sweep` tokens, and the
    three fastest for one token: which shape of a program suits which product, what the zeroing and the cast
    around the kernel cost, and whether the kernel could replace bitsandbytes' one-token product."""
    import bitsandbytes as bnb
    from triton.testing import do_bench_cudagraph

    from htmlgen_utils.levers.few_tokens import _kernel, few_token_product, kernel_arguments

    kernel = _kernel().fn  # the kernel without its autotuner
    tokens = args.sweep
    report = {**versions(), "device": torch.cuda.get_device_name(), "tokens": tokens, "products": {}}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (rows, cols, unnested) in PRODUCTS.items():
            weight, state = four_bit_weight(rows, cols, unnested)
            x = torch.randn(tokens, cols, dtype=torch.float16, device="cuda")
            out = torch.zeros((tokens, rows), dtype=torch.float32, device="cuda")
            pointers = (x, *kernel_arguments(weight, state), out)
            time_kernel = functools.partial(kernel_us, kernel, pointers, rows, cols, bool(state.nested))
            configs = {name_of(config): config for config in _kernel().configs}
            times = {name: time_kernel(config, tokens) for name, config in configs.items()}
            best = sorted(times.items(), key=lambda item: item[1])
            one_token = {name: time_kernel(configs[name], 1) for name, _ in best[:3]}  # the same kernel for one token
            whole = do_bench_cudagraph(functools.partial(few_token_product, x[None], weight, state), rep=50) * 1e3
            one = do_bench_cudagraph(functools.partial(bnb.matmul_4bit, x[None, :1], weight, state), rep=50) * 1e3
            report["products"][name] = {"best": best[:8], "whole_op_us": round(whole, 2),
                                        "bitsandbytes_one_token_us": round(one, 2), "ours_one_token_us": one_token,
                                        "all": times}
            print(name, "best", best[:5], "whole op", round(whole, 2), "bnb one token", round(one, 2),
                  "ours one token", one_token, flush=True)
    write_report(report, args.out, "few_token_configs.json")


if __name__ == "__main__":
    main()
