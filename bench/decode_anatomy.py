"""Where a batch-1 decode step's GPU time goes, kernel by kernel, in one decoder layer.

    PYTHONPATH=$PWD python bench/decode_anatomy.py --out $OUT                       # one CUDA GPU, ~4 minutes
    PYTHONPATH=$PWD python bench/decode_anatomy.py --from-kernels K.json --out $OUT  # analyse a saved list

`decode_one` on the 7B shape (4-bit base, unmerged LoRA, greedy) is warmed up, then profiled for `--tokens`
tokens; the GPU's kernels (and copies) in order are saved (`decode_kernels.json`) and analysed: a token is
what runs between two greedy picks (the argmax kernel), a layer is its 4-bit products (four with q/k/v and
gate/up stacked, bitsandbytes' kernel or the decode layout's) and what runs around them. The report gives a
token's kernels, busy time and span (busy time plus the gaps between kernels, which the CUDA graph cannot
remove), and one layer from the middle of a middle token, kernel by kernel: the 4-bit products against
everything else.
"""
from __future__ import annotations

import argparse
import json
import statistics
from itertools import pairwise
from pathlib import Path

from common import REPO, write_report

FOUR_BIT = ("gemm_4bit", "nf4_column_words")  # bitsandbytes' kernel; the decode layout's (`decode_one`'s default)
PICK = "ArgMax"


def is_four_bit(name: str) -> bool:
    """A 4-bit product's kernel (not a generated kernel named after the op whose output it takes)."""
    return any(kernel in name for kernel in FOUR_BIT) and not name.startswith("triton")


def anatomy(kernels: list[list], layers: int) -> dict:
    """Summarise an ordered list of [name, start_us, duration_us] GPU events of a decode run."""
    picks = [i for i, (name, _, _) in enumerate(kernels) if PICK in name]
    tokens = [kernels[a + 1:b + 1] for a, b in pairwise(picks)]  # each ends with its own pick
    token = tokens[len(tokens) // 2]
    products = [i for i, (name, _, _) in enumerate(token) if is_four_bit(name)]
    per_layer = len(products) // layers
    middle = layers // 2
    first, last = products[middle * per_layer - 1], products[(middle + 1) * per_layer - 1]
    layer = token[first + 1:last + 1]
    busy = sum(duration for _, _, duration in token)
    span = token[-1][1] + token[-1][2] - token[0][1]
    four_bit = sum(duration for name, _, duration in layer if is_four_bit(name))
    return {"tokens_seen": len(tokens), "kernels_per_token": statistics.median(len(t) for t in tokens),
            "token_busy_us": round(busy, 1), "token_span_us": round(span, 1),
            "four_bit_products_per_token": len(products),
            "layer": {"kernels": len(layer), "busy_us": round(sum(d for _, _, d in layer), 1),
                      "four_bit_us": round(four_bit, 1),
                      "other_kernels": len(layer) - per_layer,
                      "other_us": round(sum(d for _, _, d in layer) - four_bit, 1),
                      "span_us": round(layer[-1][1] + layer[-1][2] - layer[0][1], 1),
                      "in_order": [[name[:100], round(duration, 2)] for name, _, duration in layer]}}


def profile_kernels(tokens: int, work: Path) -> tuple[list[list], int]:
    """Decode on the 7B shape under the profiler; the GPU events in order, and the model's layer count."""
    import torch
    from generation_compare import one_prompt_model
    from torch.profiler import ProfilerActivity, profile

    from htmlgen_utils.levers.decoding import decode_one

    model, tokenizer, ids = one_prompt_model(work, smoke=False)
    with torch.no_grad():
        for _ in range(2):  # compiles and captures the step (the cache it builds fits the profiled run too)
            list(decode_one(model, tokenizer, ids, 64, stop_at_html_end=False))
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            list(decode_one(model, tokenizer, ids, tokens, stop_at_html_end=False))
            torch.cuda.synchronize()
    trace = work / "decode_trace.json"
    profiler.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"]
                     if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    trace.unlink()
    return [[e["name"][:160], e["ts"], e.get("dur", 0)] for e in events], model.config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--layers", type=int, default=32, help="the model's decoder layers (with --from-kernels)")
    parser.add_argument("--from-kernels", type=Path, help="a saved decode_kernels.json to analyse")
    args = parser.parse_args()
    if args.from_kernels:
        kernels, layers = json.loads(args.from_kernels.read_text()), args.layers
    else:
        kernels, layers = profile_kernels(args.tokens, args.work)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_kernels.json").write_text(json.dumps(kernels))
    write_report(anatomy(kernels, layers), args.out, "decode_anatomy.json")


if __name__ == "__main__":
    main()
