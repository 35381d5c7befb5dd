"""Generation speed, side by side: the original's way against ours, on the 4-bit model with an unmerged LoRA.

    PYTHONPATH=$PWD python bench/generation_compare.py --out $OUT             # one CUDA GPU, ~6 minutes
    PYTHONPATH=$PWD python bench/generation_compare.py --smoke --out /tmp/b   # CPU, tiny model: checks the script

The same random-weight Llama-2-7B-shaped checkpoint as `train_compare.py`, loaded the way notebook 05 loads a
trained run (NF4 4-bit base + LoRA adapters, eval mode, KV cache), under a T4's 15 GiB, on the held-out test
descriptions (32 prompts). Random weights never write `</html>` or EOS, so every page runs to the token limit
(256 new tokens for everyone): the differences are batching and the decode step, not shorter pages.

- `seed-style`: one prompt at a time, plain `generate(max_new_tokens=256)` (the original's evaluation); it is
  slow, so it runs on the first `--seed-style-prompts` prompts and its per-example rate is compared;
- `ours`: `generate_pages` as notebook 05 runs it with the `colab-t4` preset (batch 8, static KV cache and
  compiled decode step), and without the compiled step, to show what that bought;
- batch-1 decode (the playground and the query API): plain `generate` against our compiled decode step.

First calls of a compiled setting compile (their seconds are reported as `compile_warmup_s`, not timed).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import REPO, T4_GIB, build_checkpoint, cap_memory, free_memory, peak_gib, reset_peak, versions, write_report

NEW_TOKENS = 256


def load_model(model_path: Path, smoke: bool):
    from htmlgen_utils.config import Config
    from htmlgen_utils.model import load_for_training

    config = Config.from_preset("tiny" if smoke else "colab-t4", model_id=str(model_path), run_dir="/tmp/unused")
    model, tokenizer = load_for_training(config)  # 4-bit base + fresh LoRA, unmerged, as after training
    model.eval()
    model.config.use_cache = True
    return model, tokenizer, config


def one_prompt_model(work: Path, smoke: bool, layers: int | None = None):
    """What the batch-1 decode benchmarks run: the model (7B shape under a T4's cap, `layers` of its 32 decoder
    layers if given, or the tiny one with `smoke`) as `load_model` loads it, its tokenizer, and the first test
    description's prompt as token ids."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.packing import build_prompt

    model_path = build_checkpoint(work / f"llama2-7b-shaped{f'-{layers}-layers' if layers else ''}", smoke=smoke,
                                  layers=layers)
    cap_memory(None if smoke else T4_GIB)
    description = load_splits(Config.from_preset("colab-t4"))[0]["test"]["label"][0]
    model, tokenizer, _ = load_model(model_path, smoke)
    device = next(model.parameters()).device
    return model, tokenizer, tokenizer([build_prompt(description)], return_tensors="pt").input_ids.to(device)


def timed(model, tokenizer, prompts: list[str], batch: int, compile_decode: bool, warmup: bool,
          stop: bool = True) -> dict:
    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.packing import build_prompt

    row = {"batch": batch, "compile_decode": compile_decode, "prompts": len(prompts)}
    if warmup:  # compile for this batch size and the cache the longest prompts need
        longest = sorted(prompts, key=lambda p: len(tokenizer(build_prompt(p)).input_ids))[-batch:]
        started = time.perf_counter()
        generate_pages(model, tokenizer, longest, NEW_TOKENS, batch, compile_decode=compile_decode)
        row["compile_warmup_s"] = round(time.perf_counter() - started, 1)
    free_memory()
    reset_peak()
    try:
        result = generate_pages(model, tokenizer, prompts, NEW_TOKENS, batch, stop_at_html_end=stop,
                                compile_decode=compile_decode)
    except torch.OutOfMemoryError:
        return {**row, "oom": True}
    summary = result.summary()
    row.update(examples_per_s=summary["examples_per_s"], tokens_per_s=summary["tokens_per_s"],
               new_tokens=summary["new_tokens"], seconds=summary["seconds"], peak_gib=peak_gib(), oom=False)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed-style-prompts", type=int, default=4)
    parser.add_argument("--batches", default="8,16", help="our batch sizes (the colab-t4 preset's is 8)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    model_path = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    cap_memory(None if args.smoke else T4_GIB)

    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits

    prompts = list(load_splits(Config.from_preset("colab-t4"))[0]["test"]["label"][:args.prompts])
    model, tokenizer, config = load_model(model_path, args.smoke)
    report = {**versions(), "memory_cap_gib": None if args.smoke else T4_GIB, "smoke": args.smoke,
              "new_tokens_per_page": NEW_TOKENS, "rows": {}}
    rows = report["rows"]
    save = lambda: write_report(report, args.out, "generation_compare.json", quiet=True)  # noqa: E731
    # the original's way: one at a time, plain generate, no stop
    timed(model, tokenizer, prompts[:1], 1, False, warmup=False, stop=False)  # CUDA start-up, not timed below
    rows["seed-style, one at a time"] = timed(model, tokenizer, prompts[:args.seed_style_prompts], 1, False, False,
                                             stop=False)
    save()
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        rows[f"ours, batch {batch}, compiled decode"] = timed(model, tokenizer, prompts, batch, True, warmup=True)
        save()
    rows[f"ours, batch {batches[0]}, eager decode"] = timed(model, tokenizer, prompts[:batches[0]], batches[0], False,
                                                            False)
    save()
    rows["batch-1 decode, compiled"] = timed(model, tokenizer, prompts[:2], 1, True, warmup=True)
    save()
    seed = rows["seed-style, one at a time"]
    report["speedups"] = {name: {"examples_per_s_vs_seed_style": round(row["examples_per_s"] / seed["examples_per_s"], 2),
                                 "tokens_per_s_vs_seed_style": round(row["tokens_per_s"] / seed["tokens_per_s"], 2)}
                          for name, row in rows.items() if row.get("examples_per_s")}
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "generation_compare.json")


if __name__ == "__main__":
    main()
