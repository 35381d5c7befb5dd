"""What un-checkpointed layers cost in memory and buy in speed: the measurements behind `levers/recompute.py`.

    PYTHONPATH=$PWD python bench/recompute_calibration.py --out $OUT        # one CUDA GPU, ~5 minutes
    PYTHONPATH=$PWD python bench/recompute_calibration.py --smoke --out /tmp/bench   # CPU, tiny model

For each (block, k) in its own process, under a T4's 15 GiB: the `colab-t4` preset with the checkpoints kept on the
GPU and exactly the last k decoder layers un-checkpointed (compiled layers, fp16), one warm-up optimiser step and
`--steps` measured. Reports the memory after load, the training peak, tokens/s, and the per-token figures the
memory model uses: the step's own peak with every layer checkpointed and what one un-checkpointed layer adds, in
hidden-size vectors (8 KiB each for the 7B shape in fp16). Also today's low-memory mode (`colab-t4-low-memory`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, T4_GIB, build_checkpoint, cap_memory, peak_gib, reset_peak, sync, versions, write_report

RUNS = [(2048, 0), (2048, 8), (2048, 16), (4096, 0), (4096, 6)]


def worker(args: argparse.Namespace) -> None:
    from htmlgen_utils.config import Config
    from htmlgen_utils.levers import apply_training_levers, leave_layers_unchecked
    from htmlgen_utils.model import load_for_training
    from htmlgen_utils.packing import load_packed
    from htmlgen_utils.stages import prepare_data
    from htmlgen_utils.train import train

    cap_memory(None if args.smoke else T4_GIB)
    preset = "tiny" if args.smoke else args.preset
    overrides = {"precision": "fp32", "gradient_checkpointing": True} if args.smoke else {}
    if args.preset == "colab-t4":
        overrides.update(memory_budget_gib=0.0, offload_activations="off")  # k is set by hand below
    run_dir = Path(args.work) / f"calibration-{args.block}"
    config = Config.from_preset(
        preset,
        model_id=args.model,
        run_dir=str(run_dir),
        block_size=args.block,
        max_example_tokens=min(args.block, 2048),
        max_steps=args.steps + 1,
        warmup_steps=0,
        eval_every=10_000,
        max_eval_batches=1,
        checkpoint_every=0,
        wandb_mode="disabled",
        **overrides,
    )
    if not (run_dir / "packed" / "dataset_dict.json").exists():
        prepare_data(config)
    model, tokenizer = load_for_training(config)
    leave_layers_unchecked(model, args.unchecked)
    device = next(model.parameters()).device
    apply_training_levers(model, config, device)  # compiled whatever the run's length (we measure steady steps)
    sync()
    after_load = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    reset_peak()
    state = train(model, tokenizer, load_packed(run_dir), config, run_dir, resume=False)
    steps = [h for h in state.history if "tokens_per_s" in h]
    rates = sorted(h["tokens_per_s"] for h in steps[1:])
    print(
        "ROW "
        + json.dumps(
            {
                "block": args.block,
                "unchecked": args.unchecked,
                "preset": args.preset,
                "after_load_gib": after_load,
                "peak_gib": peak_gib(),
                "first_step_s": round(steps[0]["seconds"], 1),
                "tokens_per_s": rates[len(rates) // 2] if rates else None,
                "all_tokens_per_s": rates,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--unchecked", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="colab-t4", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    model_path = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    runs = [(512, 0), (512, 2)] if args.smoke else RUNS
    jobs = [(block, k, "colab-t4") for block, k in runs] + [(runs[0][0], 0, "colab-t4-low-memory")]
    rows = []
    for block, k, preset in jobs:
        started = time.perf_counter()
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--block",
            str(block),
            "--unchecked",
            str(k),
            "--model",
            str(model_path),
            "--work",
            str(args.work),
            "--steps",
            str(args.steps),
            "--preset",
            preset,
        ]
        command += ["--smoke"] if args.smoke else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        rows += found or [{"block": block, "unchecked": k, "preset": preset, "error": done.stderr[-2500:]}]
        print(f"{preset} {block} k={k}: {time.perf_counter() - started:.0f} s", json.dumps(rows[-1]), flush=True)
    fits = {}
    for block in sorted({r["block"] for r in rows}):
        mine = sorted(
            (r for r in rows if r["block"] == block and r.get("peak_gib") and r["preset"] == "colab-t4"),
            key=lambda r: r["unchecked"],
        )
        if len(mine) >= 2:
            vector_gib = block * 4096 * 2 / 2**30  # one hidden-size fp16 vector per token of the block
            slope = (mine[-1]["peak_gib"] - mine[0]["peak_gib"]) / (mine[-1]["unchecked"] - mine[0]["unchecked"])
            fits[str(block)] = {
                "layer_vectors": round(slope / vector_gib, 1),
                "step_vectors_with_checkpoints_on_gpu": round(
                    (mine[0]["peak_gib"] - mine[0]["after_load_gib"]) / vector_gib, 1
                ),
            }
    write_report({**versions(), "rows": rows, "per_token_vectors": fits}, args.out, "recompute_calibration.json")


if __name__ == "__main__":
    main()
