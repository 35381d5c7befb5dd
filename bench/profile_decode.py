"""Where batch-1 decoding's time goes (the playground and the query API), on the 4-bit model with an unmerged LoRA.

    PYTHONPATH=$PWD python bench/profile_decode.py --out $OUT             # one CUDA GPU, ~3 minutes
    PYTHONPATH=$PWD python bench/profile_decode.py --smoke --out /tmp/b   # CPU, tiny model: checks the script

One prompt, greedy, a fixed number of new tokens (no stop), five ways: plain `generate` (the original's way);
`generate` with our static cache and transformers' compiled decode step; `before`, our batch-1 loop as it was
(transformers' compiled step for each token); `levers`, the same with `one_query_attention` and
`OneTokenLinear`; and ours, `decode_one` as it is (the levers in its own CUDA graph, `DecodeStep`).
Each way is warmed up once (which compiles), then timed `--repeats` times, the ways interleaved (A B C A B C
...): tokens/s as the median, min and max of the repeats, and peak memory. Then a profile of a shorter run of
each: wall time per token against the time the GPU was busy per token (the rest is the GPU waiting for the
host), kernels per token, GPU time by kind. torch.compile's graph breaks and CUDA-graph skips
come last.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

import torch
from common import (
    REPO,
    CompilerLog,
    compiler_counters,
    gpu_timeline,
    peak_gib,
    reset_peak,
    sync,
    versions,
    write_report,
)


def decode_one_as_before(model, tokenizer, input_ids, max_new_tokens: int, levers: bool) -> int:
    """Greedy `decode_one` as it was before `DecodeStep` (for the comparison): transformers' compiled step
    (`mode="reduce-overhead"`, torch.compile's CUDA-graph trees) called for every token, and with `levers=False`
    also without `one_query_attention` and `OneTokenLinear` (SDPA and cuBLAS GEMMs). Returns the new tokens."""
    from transformers import CompileConfig

    from htmlgen_utils.levers import decoding

    base = model.get_base_model()
    saved = decoding.ONE_QUERY_ATTENTION
    if levers:
        decoding.use_one_token_lora(model)
    else:
        decoding.ONE_QUERY_ATTENTION = "sdpa"
        for module in model.modules():
            if type(module) is decoding.OneTokenLinear:
                module.__class__ = torch.nn.Linear
    try:
        length = input_ids.shape[1]
        cache = decoding.static_cache(model, 1, length + max_new_tokens)
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        step = base.get_compiled_call(CompileConfig())
        positions = torch.arange(length + max_new_tokens, device=input_ids.device)
        new = torch.empty((1, max_new_tokens), dtype=torch.long, device=input_ids.device)
        logits = base(
            input_ids=input_ids, **{name: cache}, cache_position=positions[:length], use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        for start in range(0, max_new_tokens, decoding.STOP_CHECK_TOKENS):
            stop = min(start + decoding.STOP_CHECK_TOKENS, max_new_tokens)
            with decoding.compiled_decoding(model):
                for i in range(start, stop):
                    token = logits.argmax(-1, keepdim=True)
                    new[:, i] = token[:, 0]
                    if i + 1 < max_new_tokens:
                        torch.compiler.cudagraph_mark_step_begin()
                        position = positions[length + i : length + i + 1]
                        logits = step(
                            input_ids=token,
                            **{name: cache},
                            cache_position=position,
                            position_ids=position[None],
                            use_cache=True,
                        ).logits[:, -1]
            new[0, start:stop].tolist()  # the read-back every piece
        return max_new_tokens
    finally:
        decoding.ONE_QUERY_ATTENTION = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=256, help="new tokens in each timed run")
    parser.add_argument(
        "--ways",
        default="plain,static,before,levers,ours",
        help="which of plain, static, before, levers, ours to run",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from common import one_prompt_model
    from torch.profiler import ProfilerActivity, profile

    from htmlgen_utils.generation import _generation_kwargs
    from htmlgen_utils.levers.decoding import decode_one, generate_with_static_cache, static_cache

    model, tokenizer, input_ids = one_prompt_model(args.work, args.smoke)
    compiler_log = CompilerLog()

    def plain_generate(tokens: int) -> int:
        model.generate(input_ids, **_generation_kwargs(tokenizer, tokens, False, 0, 0, False))
        return tokens

    def compiled_generate(tokens: int) -> int:
        cache = static_cache(model, 1, input_ids.shape[1] + tokens)
        kwargs = _generation_kwargs(tokenizer, tokens, False, 0, 0, False)
        generate_with_static_cache(model, cache, input_ids=input_ids, **kwargs)
        return tokens

    def ours(tokens: int) -> int:
        return sum(len(piece) for piece in decode_one(model, tokenizer, input_ids, tokens, stop_at_html_end=False))

    ways = {
        "plain generate": plain_generate,
        "generate, static cache + compiled step": compiled_generate,
        "before: compiled step (CUDA-graph trees), SDPA, cuBLAS LoRA": lambda tokens: decode_one_as_before(
            model, tokenizer, input_ids, tokens, levers=False
        ),
        "levers: the same with one-query attention and one-token LoRA": lambda tokens: decode_one_as_before(
            model, tokenizer, input_ids, tokens, levers=True
        ),
        "ours: decode_one, the levers in its own CUDA graph": ours,
    }
    chosen = dict(zip(("plain", "static", "before", "levers", "ours"), ways))
    ways = {chosen[key]: ways[chosen[key]] for key in args.ways.split(",")}
    report = {
        **versions(),
        "smoke": args.smoke,
        "prompt_tokens": input_ids.shape[1],
        "repeats": args.repeats,
        "rows": {},
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    rates: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        for name, run in ways.items():
            reset_peak()
            started = time.perf_counter()
            run(args.tokens)  # warm-up: compiles
            report["rows"][name] = {"warmup_s": round(time.perf_counter() - started, 1), "warmup_peak_gib": peak_gib()}
            print(name, "warmed up", report["rows"][name], flush=True)
        for _ in range(args.repeats):  # interleaved, so drift on a shared GPU hits every way alike
            for name, run in ways.items():
                reset_peak()
                started = time.perf_counter()
                tokens = run(args.tokens)
                sync()
                rates[name].append(tokens / (time.perf_counter() - started))
                report["rows"][name]["peak_gib"] = max(report["rows"][name].get("peak_gib") or 0, peak_gib() or 0)
        for name, run in ways.items():
            row = report["rows"][name]
            row.update(
                tokens_per_s=round(statistics.median(rates[name]), 2),
                new_tokens=args.tokens,
                tokens_per_s_min=round(min(rates[name]), 2),
                tokens_per_s_max=round(max(rates[name]), 2),
                wall_ms_per_token=round(1e3 / statistics.median(rates[name]), 2),
            )
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
                row.update(
                    gpu_busy_ms_per_token=round(1e3 * timeline.pop("gpu_busy_s") / tokens, 2),
                    kernels_per_token=timeline.pop("kernels_per_step"),
                    copies_per_token=timeline.pop("copies_per_step"),
                    ms_per_token_by_kind={
                        k: round(1e3 * v / tokens, 3) for k, v in timeline["seconds_by_kind"].items()
                    },
                    top_kernels=timeline["top_kernels"],
                )
            host_ops = sorted(
                (e for e in profiler.key_averages() if e.device_type.name == "CPU"),
                key=lambda e: e.self_cpu_time_total,
                reverse=True,
            )
            row["top_host_ops"] = [
                {"name": e.key[:80], "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1)}
                for e in host_ops[:8]
            ]
            print(name, {k: v for k, v in row.items() if k != "top_host_ops"}, flush=True)
    if "plain generate" in report["rows"]:
        plain = report["rows"]["plain generate"]["tokens_per_s"]
        report["speedup_vs_plain_generate"] = {
            name: round(row["tokens_per_s"] / plain, 2) for name, row in report["rows"].items()
        }
    if "before" in args.ways.split(","):
        before = report["rows"][chosen["before"]]["tokens_per_s"]
        report["speedup_vs_before"] = {
            name: round(row["tokens_per_s"] / before, 2) for name, row in report["rows"].items()
        }
    report["compiler"] = {**compiler_counters(), "log": compiler_log.messages}
    write_report(report, args.out, "profile_decode.json")


if __name__ == "__main__":
    main()
