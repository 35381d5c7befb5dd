"""Where one training step's time goes: torch.profiler over optimiser steps of ours, on the 7B shape.

    PYTHONPATH=$PWD python bench/profile_step.py --out $OUT [--block 2048] [-p compile_training true]
    PYTHONPATH=$PWD python bench/profile_step.py --out $OUT --block 4096 --cap-gib 0 -p gradient_checkpointing false
    PYTHONPATH=$PWD python bench/profile_step.py --smoke --out /tmp/bench     # CPU, tiny model

Trains the `colab-t4` preset (plus any `-p KEY VALUE` overrides) for two optimiser steps of warm-up, then
profiles two more, and reports the wall time against the time the GPU was busy (any kernel or copy running,
overlaps counted once) -- the gap is the GPU waiting for launches and Python --, the GPU time by kind of kernel,
the kernels that took longest, the host-side operators that took longest, and torch.compile's graph breaks.
Prints one JSON report last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    REPO,
    T4_GIB,
    CompilerLog,
    build_checkpoint,
    cap_memory,
    compiler_counters,
    gpu_timeline,
    peak_gib,
    reset_peak,
    sync,
    versions,
    write_report,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--cap-gib",
        type=float,
        default=T4_GIB,
        help="GPU memory this process may use (a T4's by default; 0: the whole GPU, e.g. to time "
        "-p gradient_checkpointing false at 4096, the floor no recompute policy can beat)",
    )
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from htmlgen_utils.config import Config
    from htmlgen_utils.levers import apply_training_levers
    from htmlgen_utils.model import load_for_training
    from htmlgen_utils.packing import load_packed
    from htmlgen_utils.stages import prepare_data
    from htmlgen_utils.train import train

    model_path = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    cap_memory(None if args.smoke else args.cap_gib)
    overrides = {key: Config.parse_value(value) for key, value in args.p}
    if args.smoke:
        overrides["precision"] = "fp32"
    run_dir = args.work / f"profile-{args.block}"
    config = Config.from_preset(
        "tiny" if args.smoke else "colab-t4",
        model_id=str(model_path),
        run_dir=str(run_dir),
        block_size=args.block,
        max_example_tokens=min(args.block, 2048),
        wandb_mode="disabled",
        warmup_steps=0,
        eval_every=10_000,
        max_eval_batches=1,
        checkpoint_every=0,
        max_steps=2,
        **overrides,
    )
    if not (run_dir / "packed" / "dataset_dict.json").exists():
        prepare_data(config)
    packed = load_packed(run_dir)
    model, tokenizer = load_for_training(config)
    apply_training_levers(model, config, next(model.parameters()).device)  # compiled, however short the run
    compiler_log = CompilerLog()
    train(model, tokenizer, packed, config, run_dir, resume=False)  # warm-up (and compilation)
    reset_peak()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        sync()
        started = time.perf_counter()
        state = train(model, tokenizer, packed, config, run_dir, resume=False)
        sync()
        wall = time.perf_counter() - started
    on_gpu = torch.cuda.is_available()
    events = profiler.key_averages()
    key = "device_time_total" if on_gpu else "self_cpu_time_total"
    kernels = [e for e in events if (e.device_type.name == "CUDA") == on_gpu and getattr(e, key, 0) > 0]
    kernels.sort(key=lambda e: getattr(e, key), reverse=True)
    host_ops = sorted(
        (e for e in events if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    steps = [h for h in state.history if "tokens_per_s" in h]
    report = {
        **versions(),
        "block": args.block,
        "overrides": overrides,
        "cap_gib": args.cap_gib or None,
        "profiled_wall_s": round(wall, 3),
        **(gpu_timeline(profiler, args.work / "trace.json", len(steps)) if on_gpu else {}),
        "tokens_per_s": [round(h["tokens_per_s"], 1) for h in steps],
        "peak_gib": peak_gib(),
        "top": [
            {"name": e.key[:90], "calls": e.count, "ms": round(getattr(e, key) / 1e3, 1)} for e in kernels[: args.top]
        ],
        "top_host_ops": [
            {"name": e.key[:90], "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1)}
            for e in host_ops[:15]
        ],
        "compiler": {**compiler_counters(), "log": compiler_log.messages},
    }
    if on_gpu:  # the matmul work a token costs, which recompute adds to (forward 1 + recompute 1 + backward 2)
        tokens = sum(h["tokens_per_s"] * h["seconds"] for h in steps)
        report["gemm_us_per_token"] = round(report["seconds_by_kind"].get("gemm", 0.0) / tokens * 1e6, 2)
        report["tokens_profiled"] = round(tokens)
    write_report(report, args.out, "profile_step.json")


if __name__ == "__main__":
    main()
