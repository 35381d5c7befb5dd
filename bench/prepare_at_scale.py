"""Preparing a large corpus on CPU: read -> clean -> split -> save, then tokenise -> pack -> save, with the time
and the process's peak memory of each stage.

    python bench/prepare_at_scale.py --pairs 100000 --out bench/results/2026-11-29_prepare_100k_cpu.json

The pairs come from the bundled dataset's generator (pages of ~1-3k characters), written to a .jsonl file first
(not timed). The tokenizer is the tiny model's (the Llama-2 tokenizer needs the hub); with Llama-2's a page is
fewer, longer tokens, so tokenising costs about the same per character.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_saved_splits, load_splits, save_splits
    from htmlgen_utils.dataset_generator import generate_dataset
    from htmlgen_utils.model import load_tokenizer
    from htmlgen_utils.packing import pack_splits, save_packed

    work = Path(tempfile.mkdtemp(prefix="htmlgen-scale-"))
    corpus = work / "pairs.jsonl"
    with corpus.open("w", encoding="utf-8") as handle:
        for row in generate_dataset(args.pairs, seed=7):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = Config.from_preset("tiny", dataset=str(corpus), run_dir=str(work / "run"), block_size=args.block_size,
                                max_example_tokens=args.block_size)
    stages, started = {}, time.perf_counter()

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = {"seconds": round(now - since, 1), "peak_rss_gib_so_far": round(peak_rss_gib(), 2)}
        print(name, stages[name], flush=True)
        return now

    baseline = peak_rss_gib()
    t = time.perf_counter()
    splits, report = load_splits(config)
    t = stage("read, clean, dedupe, split", t)
    save_splits(splits, report, config.run_dir)
    t = stage("save splits (jsonl)", t)
    splits = load_saved_splits(config.run_dir)
    t = stage("read splits back", t)
    tokenizer = load_tokenizer(config.model_id)
    packed, stats = pack_splits(splits, tokenizer, config)
    t = stage("tokenise and pack", t)
    save_packed(packed, stats, config.run_dir)
    stage("save blocks", t)
    result = {"pairs": args.pairs, "corpus_mb": round(corpus.stat().st_size / 1e6, 1), "cpu_cores": os.cpu_count(),
              "block_size": args.block_size, "rows_kept": report.rows_kept, "train_blocks": stats["train"].blocks,
              "train_fill_rate": round(stats["train"].fill_rate, 4), "rss_before_gib": round(baseline, 2),
              "stages": stages, "total_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
