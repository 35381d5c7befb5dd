"""The bundled data as the `colab-t4` preset packs it with the real Llama-2 tokenizer: blocks, steps, tokens.

    PYTHONPATH=$PWD python bench/token_counts.py --tokenizer DIR --out bench/results    # CPU, ~1 minute

DIR holds Llama-2's `tokenizer.model` (the SentencePiece file Meta publishes with the weights; the same file is in
public repositories such as karpathy/llama2.c) and a `tokenizer_config.json` naming `LlamaTokenizer`; loading it
needs `sentencepiece` and `protobuf`. The hub is not needed. The counts feed README's T4 time table and notebook
04's estimate arithmetic (the training-time estimate with Llama-2-7B's 6.74e9 parameters, 32 layers, hidden 4,096).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import REPO, write_report

LLAMA2_7B_PARAMETERS, LLAMA2_7B_LAYERS, LLAMA2_7B_HIDDEN = 6_738_415_616, 32, 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a folder with Llama-2's tokenizer.model")
    parser.add_argument("--preset", default="colab-t4")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.model import load_tokenizer
    from htmlgen_utils.notebook import estimate_training_time
    from htmlgen_utils.packing import build_prompt, pack_splits
    from htmlgen_utils.train import cadence, plan_steps

    with tempfile.TemporaryDirectory() as run_dir:
        config = Config.from_preset(args.preset, model_id=args.tokenizer, run_dir=run_dir)
        tokenizer = load_tokenizer(args.tokenizer)
        splits, _ = load_splits(config)
        lengths = [len(tokenizer(build_prompt(row["label"]) + row["html"]).input_ids) + 1 for row in splits["train"]]
        packed, stats = pack_splits(splits, tokenizer, config)
    accumulation, steps_per_epoch, total = plan_steps(len(packed["train"]), config)
    checkpoint_every, eval_every = cadence(config, total)
    estimate = estimate_training_time(
        config, len(packed["train"]), LLAMA2_7B_PARAMETERS, layers=LLAMA2_7B_LAYERS, hidden=LLAMA2_7B_HIDDEN
    )
    report = {
        "tokenizer": "Llama-2 (tokenizer.model, SentencePiece, 32,000 tokens)",
        "preset": args.preset,
        "block_size": config.block_size,
        "rows": {name: len(split) for name, split in splits.items()},
        "train_example_tokens": {
            "median": statistics.median(lengths),
            "max": max(lengths),
            "over_block": sum(n > config.block_size for n in lengths),
        },
        "blocks": {name: len(split) for name, split in packed.items()},
        "packing": {name: s.to_dict() for name, s in stats.items()},
        "accumulation": accumulation,
        "steps_per_epoch": steps_per_epoch,
        "planned_steps": total,
        "tokens_per_step": estimate["tokens_per_step"],
        "checkpoint_every": checkpoint_every,
        "eval_every": eval_every,
        "estimate_at_20_tflops": {k: round(v, 2) if isinstance(v, float) else v for k, v in estimate.items()},
    }
    write_report(report, args.out, "token_counts_llama2.json")


if __name__ == "__main__":
    main()
