"""How long an example the T4 preset trains: one whole example per block, 4,096 tokens and up, on the 7B shape.

    PYTHONPATH=$PWD python bench/long_examples.py --out $OUT                # one GPU, ~8 minutes
    PYTHONPATH=$PWD python bench/long_examples.py --smoke --out /tmp/bench   # CPU, tiny model: checks the script

The checkpoint has Llama-2-7B's shape *and* its 4,096-token context, so examples beyond 4,096 tokens train with
the `colab-t4` preset's RoPE scaling (`rope_scaling=auto`: linear, factor length / 4,096); the scaling changes
neither speed nor memory. Data: the bundled long pages joined into pages of ~100k+ tokens, cut to the example
length by the `truncate_close` policy (cut at a tag boundary, open elements closed, EOS), so every block holds one
whole example that ends. Each length runs in its own process under the 15 GiB cap (a T4's), lengths ascending,
until one runs out of memory: `tokens_per_s` (median of the measured optimiser steps after one warm-up step that
also compiles), `peak_gib` (`max_memory_allocated` over load and training).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, T4_GIB, build_checkpoint, cap_memory, free_memory, peak_gib, reset_peak, versions, write_report

import torch

LENGTHS = (4096, 8192, 16384, 24576, 32768)


def long_rows(pages_per_row: int = 8, rows: int = 48) -> list[dict]:
    """Very long pages: the bundled long pages' bodies joined, several to a page."""
    from htmlgen_utils.data import load_raw

    long = load_raw("bundled-long")
    out = []
    for i in range(rows):
        parts = [long[(i * pages_per_row + k) % len(long)]["html"] for k in range(pages_per_row)]
        bodies = [p.split("<body>", 1)[1].rsplit("</body>", 1)[0] for p in parts]
        out.append({"label": long[i % len(long)]["label"], "html": parts[0].split("<body>", 1)[0] + "<body>\n"
                    + "\n".join(bodies) + "\n</body>\n</html>"})
    return out


def worker(args: argparse.Namespace) -> None:
    from htmlgen_utils.config import Config
    from htmlgen_utils.model import load_for_training, load_tokenizer
    from htmlgen_utils.stages import ensure_packed
    from htmlgen_utils.train import train

    cap_memory(None if args.smoke else T4_GIB)
    length = args.length
    data_file = Path(args.work) / "long_rows.json"
    overrides = {"precision": "fp32"} if args.smoke else {}
    config = Config.from_preset("tiny" if args.smoke else "colab-t4", model_id=args.model, dataset=str(data_file),
                                run_dir=str(Path(args.work) / f"run-{length}"), block_size=length,
                                max_example_tokens=length, long_page_policy="truncate_close", max_steps=args.steps,
                                eval_every=10_000, max_eval_batches=1, checkpoint_every=0, warmup_steps=0,
                                wandb_mode="disabled", **overrides)
    row = {"example_tokens": length}
    packed = ensure_packed(config, load_tokenizer(config.model_id))
    starts = [[i for i, p in enumerate(positions) if p == 0] for positions in packed["train"]["position_ids"][:4]]
    row["first_example_tokens"] = [s[1] if len(s) > 1 else length for s in starts]  # padding restarts at 0
    free_memory()
    reset_peak()
    try:
        model, tokenizer = load_for_training(config)
        row["rope"] = dict(getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", {}))
        started = time.perf_counter()
        state = train(model, tokenizer, packed, config, config.run_dir, resume=False)
        steps = [h for h in state.history if "tokens_per_s" in h]
        rates = sorted(h["tokens_per_s"] for h in steps[1:]) or [steps[0]["tokens_per_s"]]
        row.update(oom=False, tokens_per_s=round(rates[len(rates) // 2], 1), peak_gib=peak_gib(),
                   first_step_s=round(steps[0]["seconds"], 1), steps=len(steps),
                   seconds=round(time.perf_counter() - started, 1), skipped=state.skipped_steps,
                   final_loss=round(steps[-1]["loss"], 4))
    except torch.OutOfMemoryError:
        row.update(oom=True, peak_gib=peak_gib())
    print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-long"))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per length (the first compiles)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.work / "llama2-7b-shaped-4k", smoke=args.smoke, max_position_embeddings=4096)
    (args.work / "long_rows.json").write_text(json.dumps(long_rows()))
    report = {**versions(), "memory_cap_gib": None if args.smoke else T4_GIB, "smoke": args.smoke,
              "preset": "colab-t4 (fp16 + GradScaler, compiled layers, checkpoints offloaded, accumulation 4)",
              "rows": []}
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.smoke:
        lengths = [512, 1024, 2048]  # the tiny base has a 1,024-token context: 2,048 uses RoPE scaling
    for length in lengths:
        command = [sys.executable, __file__, "--worker", "--length", str(length), "--model", str(model),
                   "--work", str(args.work), "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode != 0 and not rows:
            rows = [{"example_tokens": length, "error": done.stderr[-2000:]}]
        print(*map(json.dumps, rows), sep="\n", flush=True)
        report["rows"] += rows
        write_report(report, args.out, "long_examples.json", quiet=True)
        if any(r.get("oom") or r.get("error") for r in rows):
            break
    fits = [r["example_tokens"] for r in report["rows"] if r.get("oom") is False]
    report["longest_example_under_cap"] = max(fits) if fits else None
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "long_examples.json")


if __name__ == "__main__":
    main()
