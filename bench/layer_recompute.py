"""What one compiled 7B decoder layer keeps for its backward, and what its forward + backward costs, per way of
recomputing it: the measurements behind choosing what a layer recomputes.

    PYTHONPATH=$PWD python bench/layer_recompute.py --out $OUT [--block 4096]   # one CUDA GPU, ~6 minutes
    PYTHONPATH=$PWD python bench/layer_recompute.py --smoke --out /tmp/bench   # CPU, tiny model

One decoder layer of the Llama-2-7B shape in 4-bit with LoRA r16 (dropout 0.05) on its seven linear layers, loaded
the way training loads it, compiled, fp16 autocast, one block of `--block` tokens. Each way runs in its own process
(compiler settings are global): after two warm-up passes, the memory the forward leaves behind for the backward
(in hidden-size vectors per token: 8 KiB each for the 7B shape in fp16; `kept_vectors` from the allocator,
`saved_vectors` from the tensors saved for backward, also on CPU), the backward's peak above that, the
forward + backward time (median and min-max of `--repeats`), and the GPU time by kind from one profiled pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, build_checkpoint, kernel_kind, sync, versions, write_report

WAYS = [
    "checkpointed",
    "unchecked",
    "budget-0.1",
    "budget-0.2",
    "budget-0.3",
    "budget-0.4",
    "budget-0.5",
    "budget-0.6",
    "budget-0.7",
    "budget-0.8",
]


def worker(args: argparse.Namespace) -> None:
    from htmlgen_utils.config import Config
    from htmlgen_utils.levers import compile_decoder_layers
    from htmlgen_utils.model import load_for_training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Config.from_preset(
        "tiny" if args.smoke else "colab-t4",
        model_id=args.model,
        precision="fp16" if device.type == "cuda" else "fp32",
        gradient_checkpointing=True,
        wandb_mode="disabled",
    )
    model, _ = load_for_training(config)
    model.train()
    decoder = model.get_base_model().model
    layer = decoder.layers[0]
    layer.gradient_checkpointing = args.way == "checkpointed"
    # budget-b: the compiler keeps what is expensive to redo within this share of what it would keep
    compile_decoder_layers(model, float(args.way.split("-")[1]) if args.way.startswith("budget-") else None)

    hidden = model.config.hidden_size
    torch.manual_seed(0)
    x = torch.randn(
        1,
        args.block,
        hidden,
        device=device,
        dtype=torch.float16 if device.type == "cuda" else torch.float32,
        requires_grad=True,
    )
    positions = torch.arange(args.block, device=device)[None]
    rotary = decoder.rotary_emb(x, positions)
    grad = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    cuda = device.type == "cuda"

    def forward():
        with autocast:
            out = layer(x, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    def one_pass():
        forward().backward(grad)
        x.grad = None
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # the first compiles
        one_pass()
    sync()
    vector_bytes = args.block * hidden * 2
    saved = [0]

    def count(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        one_pass()  # what the forward hands its backward, counted on any device
    row = {"way": args.way, "saved_vectors": round(saved[0] / vector_bytes, 2)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = forward()
        sync()
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        forward_peak = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        out.backward(grad)
        sync()
        backward_peak = torch.cuda.max_memory_allocated() - before
        del out
        x.grad = None
        model.zero_grad(set_to_none=True)
        row.update(
            kept_vectors=round(kept / vector_bytes, 2),
            forward_peak_vectors=round(forward_peak / vector_bytes, 2),
            backward_peak_vectors=round(backward_peak / vector_bytes, 2),
        )
    times = []
    for _ in range(args.repeats):
        sync()
        started = time.perf_counter()
        one_pass()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    row.update(ms_median=round(statistics.median(times), 2), ms_min=round(min(times), 2), ms_max=round(max(times), 2))
    if cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            one_pass()
            sync()
        by_kind: dict[str, float] = {}
        for event in profiler.key_averages():
            microseconds = getattr(event, "self_device_time_total", 0) or 0
            if microseconds <= 0:
                continue
            kind = kernel_kind(event.key, other="other")
            by_kind[kind] = by_kind.get(kind, 0.0) + microseconds / 1e3
        row["gpu_ms_by_kind"] = {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--name", help="the report's file name (default layer_recompute.json)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    block = 256 if args.smoke else args.block
    model_path = build_checkpoint(args.work / "llama2-7b-one-layer", smoke=args.smoke, layers=1)
    rows = []
    for way in args.ways.split(","):
        started = time.perf_counter()
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--way",
            way,
            "--model",
            str(model_path),
            "--block",
            str(block),
            "--repeats",
            str(2 if args.smoke else args.repeats),
        ]
        command += ["--smoke"] if args.smoke else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        rows += found or [{"way": way, "error": done.stderr[-3000:]}]
        print(f"{way}: {time.perf_counter() - started:.0f} s", json.dumps(rows[-1]), flush=True)
    write_report({**versions(), "block": block, "rows": rows}, args.out, args.name or "layer_recompute.json")


if __name__ == "__main__":
    main()
