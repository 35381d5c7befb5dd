"""Where batch-1 decoding's time goes (the playground and the query API), on the 4-bit model with an unmerged LoRA.

    PYTHONPATH=$PWD python bench/profile_decode.py --out $OUT             # one CUDA GPU, ~3 minutes
    PYTHONPATH=$PWD python bench/profile_decode.py --smoke --out /tmp/b   # CPU, tiny model: checks the script

One prompt, greedy, a fixed number of new tokens (no stop), three ways: plain `generate` (the original's way);
`generate` with our static cache and the compiled decode step; and ours, `decode_one`'s loop around the same
compiled step. For each: tokens/s and peak memory (of the warm-up, which compiles, and of the timed run), then a
profile of a shorter run: wall time per token against the time the GPU was busy per token (the rest is the GPU
waiting for the host), kernels per token, GPU time by kind. torch.compile's graph breaks and CUDA-graph skips
come last.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import (REPO, T4_GIB, CompilerLog, build_checkpoint, cap_memory, compiler_counters, gpu_timeline, peak_gib,
                    reset_peak, sync, versions, write_report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=256, help="new tokens in each timed run")
    parser.add_argument("--ways", default="plain,static,ours", help="which of plain, static, ours to run")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from generation_compare import load_model
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.generation import _generation_kwargs
    from htmlgen_utils.levers.decoding import decode_one, generate_with_static_cache, static_cache
    from htmlgen_utils.packing import build_prompt

    model_path = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    cap_memory(None if args.smoke else T4_GIB)
    description = load_splits(Config.from_preset("colab-t4"))[0]["test"]["label"][0]
    model, tokenizer, _ = load_model(model_path, args.smoke)
    device = next(model.parameters()).device
    input_ids = tokenizer([build_prompt(description)], return_tensors="pt").input_ids.to(device)
    compiler_log = CompilerLog()

    def plain_generate(tokens: int) -> int:
        model.generate(input_ids, **_generation_kwargs(tokenizer, tokens, False, 0, 0, False))
        return tokens

    def compiled_generate(tokens: int) -> int:
        cache = static_cache(model, 1, input_ids.shape[1] + tokens)
        generate_with_static_cache(model, cache, input_ids=input_ids, **_generation_kwargs(tokenizer, tokens, False, 0, 0,
                                                                                    False))
        return tokens

    def ours(tokens: int) -> int:
        return sum(len(piece) for piece in decode_one(model, tokenizer, input_ids, tokens, stop_at_html_end=False))

    ways = {"plain generate": plain_generate, "generate, static cache + compiled step": compiled_generate,
            "ours: decode_one, compiled step": ours}
    chosen = dict(zip(("plain", "static", "ours"), ways))
    ways = {chosen[key]: ways[chosen[key]] for key in args.ways.split(",")}
    report = {**versions(), "smoke": args.smoke, "prompt_tokens": input_ids.shape[1], "rows": {}}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad():
        for name, run in ways.items():
            reset_peak()
            started = time.perf_counter()
            run(args.tokens)  # warm-up: compiles
            warmup = time.perf_counter() - started
            warmup_peak = peak_gib()
            reset_peak()
            started = time.perf_counter()
            tokens = run(args.tokens)
            sync()
            seconds = time.perf_counter() - started
            row = {"tokens_per_s": round(tokens / seconds, 2), "new_tokens": tokens, "warmup_s": round(warmup, 1),
                   "warmup_peak_gib": warmup_peak, "peak_gib": peak_gib()}
            profiled_tokens = max(args.tokens // 4, 8)
            with profile(activities=activities) as profiler:
                sync()
                started = time.perf_counter()
                tokens = run(profiled_tokens)
                sync()
                seconds = time.perf_counter() - started
            row["profiled_ms_per_token"] = round(1e3 * seconds / tokens, 2)
            if torch.cuda.is_available():
                timeline = gpu_timeline(profiler, args.work / "trace.json", tokens)
                row.update(gpu_busy_ms_per_token=round(1e3 * timeline.pop("gpu_busy_s") / tokens, 2),
                           kernels_per_token=timeline.pop("kernels_per_step"),
                           copies_per_token=timeline.pop("copies_per_step"),
                           ms_per_token_by_kind={k: round(1e3 * v / tokens, 3)
                                                 for k, v in timeline["seconds_by_kind"].items()})
            host_ops = sorted((e for e in profiler.key_averages() if e.device_type.name == "CPU"),
                              key=lambda e: e.self_cpu_time_total, reverse=True)
            row["top_host_ops"] = [{"name": e.key[:80], "calls": e.count,
                                    "self_ms": round(e.self_cpu_time_total / 1e3, 1)} for e in host_ops[:8]]
            report["rows"][name] = row
            print(name, {k: v for k, v in row.items() if k != "top_host_ops"}, flush=True)
    if "plain generate" in report["rows"]:
        plain = report["rows"]["plain generate"]["tokens_per_s"]
        report["speedup_vs_plain_generate"] = {name: round(row["tokens_per_s"] / plain, 2)
                                               for name, row in report["rows"].items()}
    report["compiler"] = {**compiler_counters(), "log": compiler_log.messages}
    write_report(report, args.out, "profile_decode.json")


if __name__ == "__main__":
    main()
