"""Does compiling the decode step pay for notebook 05's quick evaluation? Compiled against plain `generate`.

    PYTHONPATH=$PWD python bench/quick_eval_compile.py --out $OUT          # one CUDA GPU; ~9 minutes
    PYTHONPATH=$PWD python bench/quick_eval_compile.py --smoke --out /tmp/b  # CPU, tiny model: checks the script

Notebook 05's quick evaluation on a T4 writes 8 test pages (one batch of 8) with the fine-tuned model, then the
same 8 with the adapter switched off (`disable_adapter`). Each run here is its own process pinned to two CPU
cores (`taskset -c 0,1`, as Colab's 2 vCPUs: compiling is host work), under a T4's usable memory, loading the
random-weight Llama-2-7B-shaped checkpoint as notebook 05 loads a run (4-bit base + LoRA), and makes three
passes of `--tokens` new tokens over the 8 descriptions: fine-tuned, base, fine-tuned again. The third pass is
steady state, so pass 1 minus pass 3 is what the first pass paid to compile (each process starts with empty
compiler caches, as a new Colab runtime does), and pass 2 minus pass 3 what
switching the adapter off paid (a recompile, or nothing). Random weights never end a page, so every pass makes
exactly `--tokens` tokens a page. The modes run interleaved (plain, compiled, plain, ...), `--repeats` each.

The summary gives medians and ranges, and the quick evaluation's arithmetic: plain = 2 passes x 768 tokens at
the plain step time; compiled = the compile times + 2 x 768 tokens at the compiled step time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, T4_USABLE_GIB, build_checkpoint, cap_memory, versions, write_report

QUICK_PAGES, QUICK_TOKENS = 8, 768  # notebook 05's quick evaluation (notebook.evaluation_settings)


def worker(args: argparse.Namespace) -> None:
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.model import load_for_training

    cap_memory(None if args.smoke else T4_USABLE_GIB)
    compiled = args.mode == "compiled"
    config = Config.from_preset("tiny" if args.smoke else "colab-t4", model_id=args.model, run_dir="/tmp/unused")
    started = time.perf_counter()
    model, tokenizer = load_for_training(config)  # 4-bit base + LoRA, unmerged, as notebook 05 has it
    model.eval()
    loaded = time.perf_counter() - started
    descriptions = load_splits(Config.from_preset("colab-t4"))[0]["test"]["label"][:QUICK_PAGES]
    settings = dict(
        max_new_tokens=args.tokens,
        batch_size=QUICK_PAGES,
        compile_decode=compiled,
        stop_at_html_end=False,
        stop_on_repetition=False,
    )
    passes = []
    for adapter in (True, False, True):
        if adapter:
            result = generate_pages(model, tokenizer, descriptions, **settings)
        else:
            with model.disable_adapter():
                result = generate_pages(model, tokenizer, descriptions, **settings)
        passes.append({"adapter": adapter, "seconds": round(result.seconds, 2), "new_tokens": sum(result.new_tokens)})
        print(passes[-1], flush=True)
    steady = passes[2]["seconds"]
    row = {
        "mode": args.mode,
        "load_s": round(loaded, 1),
        "passes": passes,
        "first_pass_overhead_s": round(passes[0]["seconds"] - steady, 2),
        "adapter_off_overhead_s": round(passes[1]["seconds"] - steady, 2),
        "step_ms": round(1000 * steady / args.tokens, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    print("ROW " + json.dumps(row), flush=True)


def summarise(rows: list[dict]) -> dict:
    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}

    out = {}
    for mode in ("plain", "compiled"):
        runs = [r for r in rows if r.get("mode") == mode]
        if runs:
            out[mode] = {
                key: spread([r[key] for r in runs])
                for key in ("step_ms", "first_pass_overhead_s", "adapter_off_overhead_s", "load_s")
            }
            out[mode]["runs"] = len(runs)
    if "plain" in out and "compiled" in out:
        plain_s = 2 * QUICK_TOKENS * out["plain"]["step_ms"]["median"] / 1000
        compiled_s = (
            out["compiled"]["first_pass_overhead_s"]["median"]
            + out["compiled"]["adapter_off_overhead_s"]["median"]
            + 2 * QUICK_TOKENS * out["compiled"]["step_ms"]["median"] / 1000
        )
        out["quick_evaluation_arithmetic"] = {
            "pages": QUICK_PAGES,
            "tokens_a_page": QUICK_TOKENS,
            "plain_s": round(plain_s, 1),
            "compiled_s": round(compiled_s, 1),
            "break_even_tokens_a_page": round(
                (
                    out["compiled"]["first_pass_overhead_s"]["median"]
                    + out["compiled"]["adapter_off_overhead_s"]["median"]
                )
                / max(1e-9, 2 * (out["plain"]["step_ms"]["median"] - out["compiled"]["step_ms"]["median"]) / 1000)
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=96, help="new tokens a page in each pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    model = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []
    report = {
        **versions(),
        "memory_cap_gib": None if args.smoke else T4_USABLE_GIB,
        "cores": "taskset -c 0,1",
        "tokens_a_pass": args.tokens,
        "smoke": args.smoke,
        "rows": [],
    }
    modes = ["plain"] if args.smoke and not torch.cuda.is_available() else ["plain", "compiled"]
    for repeat in range(args.repeats):
        for mode in modes:
            command = (
                pin
                + [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--mode",
                    mode,
                    "--model",
                    str(model),
                    "--tokens",
                    str(args.tokens),
                ]
                + (["--smoke"] if args.smoke else [])
            )
            run_started = time.perf_counter()
            with tempfile.TemporaryDirectory() as caches:  # cold compiler caches, as in a new Colab runtime
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": caches, "TRITON_CACHE_DIR": f"{caches}/triton"}
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
            rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0:
                rows = [{"mode": mode, "error": done.stderr[-3000:]}]
            for row in rows:
                row.update(repeat=repeat, wall_s=round(time.perf_counter() - run_started, 1))
            print(*map(json.dumps, rows), sep="\n", flush=True)
            report["rows"] += rows
            report["summary"] = summarise([r for r in report["rows"] if "error" not in r])
            write_report(report, args.out, "quick_eval_compile.json", quiet=True)  # partial results survive
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "quick_eval_compile.json")


if __name__ == "__main__":
    main()
