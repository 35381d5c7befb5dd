"""Batch-1 decoding's small kernels: do tuned block sizes, attention as generated kernels instead of cuBLAS,
or q/k/v and gate/up stacked into one layer each make a decode step faster? (Measured: only the stacking,
which the package's step now does.)

    PYTHONPATH=$PWD python bench/decode_tuning.py --out $OUT             # one CUDA GPU, ~4 minutes
    PYTHONPATH=$PWD python bench/decode_tuning.py --smoke --out /tmp/b   # CPU, tiny model: checks the script

Builds of `decode_one`'s step on the 7B shape (4-bit base, unmerged LoRA, one prompt, greedy, no stop):
`before`, the step without stacking (one-query attention as two matmuls, the compiler's default kernels);
`candidate`, the same step compiled with inductor's coordinate-descent tuning (it times block sizes for each
generated kernel, as gpt-fast does for decoding) and with the one-query attention written as two
multiply-and-sums (generated kernels that fuse the scaling, mask and softmax, instead of two cuBLAS
matrix-vector kernels); `tuned`, the step with the tuning only; `stacked`, the package's step: `before` with
each layer's q/k/v and gate/up as one layer (`levers/stacking.py`). All over bitsandbytes' layout
(`decode_one(column_words=False)`): the small kernels are the question here, `profile_decode.py` times the decode
layout.
Each build is compiled and captured once (its warm-up), then timed `--repeats` times interleaved: tokens/s as
median, min and max; then one profile each (GPU time and kernels per token). Each build's tokens are compared
with the first build's (random weights: another summation order may move a near-tie).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import REPO, gpu_timeline, peak_gib, reset_peak, sync, versions, write_report

SUMMED_ATTENTION = "htmlgen_bench_one_query_summed"


def one_query_attention_summed(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The candidate: one query's attention as a dot product per cache slot and a weighted sum of the values,
    written as multiply-and-sums so the compiler generates (and fuses) them."""
    from transformers.integrations.sdpa_attention import (
        repeat_kv,
        sdpa_attention_forward,
    )

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() * key.float()).sum(-1, keepdim=True).transpose(2, 3) * scale  # (batch, heads, 1, slots)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    out = (torch.softmax(scores, dim=-1).transpose(2, 3) * value.float()).sum(2, keepdim=True)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--builds", default="before,candidate",
                        help="which of before, tuned, candidate, stacked to build")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from generation_compare import one_prompt_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from htmlgen_utils.levers import decoding

    AttentionInterface.register(SUMMED_ATTENTION, one_query_attention_summed)
    AttentionMaskInterface.register(SUMMED_ATTENTION, sdpa_mask)
    model, tokenizer, input_ids = one_prompt_model(args.work, args.smoke)
    known = {"before": ("before: not stacked (matmul attention, default kernels)", None, False, False),
             "tuned": ("tuned: not stacked, tuned kernels", None, True, False),
             "candidate": ("candidate: multiply-and-sum attention, tuned kernels", SUMMED_ATTENTION, True, False),
             "stacked": ("stacked: the package's step, q/k/v and gate/up as one layer each", None, False, True)}
    builds = {known[key][0]: known[key][1:] for key in args.builds.split(",")}
    stores = {name: ({}, {}) for name in builds}  # each build's own static caches and captured steps
    attention = decoding.ONE_QUERY_ATTENTION

    def run(name: str, tokens: int) -> list[int]:
        """`decode_one` with this build's attention, stacking, caches and captured step (built, and compiled
        under its tuning setting, at its first call)."""
        summed, tune, stack = builds[name]
        decoding.ONE_QUERY_ATTENTION = summed or attention
        model.__dict__["_htmlgen_static_caches"], model.__dict__["_htmlgen_decode_steps"] = stores[name]
        tuning = torch._inductor.config.patch(coordinate_descent_tuning=True) if tune else nullcontext()
        try:
            with tuning:
                return [t for piece in decoding.decode_one(model, tokenizer, input_ids, tokens, stop_at_html_end=False,
                                                           stack_projections=stack, column_words=False)
                        for t in piece]
        finally:
            decoding.ONE_QUERY_ATTENTION = attention

    report = {**versions(), "smoke": args.smoke, "prompt_tokens": input_ids.shape[1], "repeats": args.repeats,
              "new_tokens": args.tokens, "rows": {}}
    tokens_of: dict[str, list[int]] = {}
    with torch.no_grad():
        for name in builds:
            torch._dynamo.reset()  # each build compiles its own step (no reuse of another's compiled graph)
            reset_peak()
            started = time.perf_counter()
            tokens_of[name] = run(name, args.tokens)
            report["rows"][name] = {"warmup_s": round(time.perf_counter() - started, 1)}
            print(name, "warmed up", report["rows"][name], flush=True)
        rates: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(args.repeats):  # interleaved
            for name in builds:
                sync()
                started = time.perf_counter()
                tokens = run(name, args.tokens)
                sync()
                rates[name].append(len(tokens) / (time.perf_counter() - started))
        first = tokens_of[next(iter(builds))]
        for name in builds:
            row = report["rows"][name]
            same = next((i for i, (a, b) in enumerate(zip(first, tokens_of[name])) if a != b), len(first))
            row.update(tokens_per_s=round(statistics.median(rates[name]), 2),
                       tokens_per_s_min=round(min(rates[name]), 2), tokens_per_s_max=round(max(rates[name]), 2),
                       ms_per_token=round(1e3 / statistics.median(rates[name]), 3),
                       tokens_equal_to_first_until=same, peak_gib=peak_gib())
            if torch.cuda.is_available():
                profiled = 32
                with profile(activities=[ProfilerActivity.CUDA]) as profiler:
                    run(name, profiled)
                    sync()
                timeline = gpu_timeline(profiler, args.work / "trace.json", profiled)
                row.update(gpu_busy_ms_per_token=round(1e3 * timeline["gpu_busy_s"] / profiled, 3),
                           kernels_per_token=timeline["kernels_per_step"],
                           ms_per_token_by_kind={k: round(1e3 * v / profiled, 3)
                                                 for k, v in timeline["seconds_by_kind"].items()})
            print(name, row, flush=True)
    before = report["rows"][next(iter(builds))]["tokens_per_s"]
    report["speedup_vs_first"] = {name: round(row["tokens_per_s"] / before, 3) for name, row in report["rows"].items()}
    write_report(report, args.out, "decode_tuning.json")


if __name__ == "__main__":
    main()
