"""Which repetition settings to default to: generation on long pages with each, fine-tuned and base model.

    python bench/repetition_settings.py --run-dir runs/tiny-long --out bench/results    # CPU, a trained run; ~5 min

For every setting (`repetition_penalty`, `no_repeat_ngram_size`, with the loop stop on) the run's test descriptions
are generated greedily with the fine-tuned model and with the adapter off, and scored: valid HTML, pages that end
with `</html>`, pages stuck in a loop, description coverage, tree edit similarity to the reference. HTML repeats
its tags legitimately, so settings that punish repetition can break pages; this measures by how much.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import write_report

SETTINGS = {"off (1.0, 0)": (1.0, 0), "penalty 1.1": (1.1, 0), "penalty 1.3": (1.3, 0), "no repeat 10-grams": (1.0, 10)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import numpy as np

    from htmlgen_utils.evaluation import (description_coverage, ends_with_html, is_valid_html, repetition,
                                          tree_edit_similarity)
    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.model import load_trained
    from htmlgen_utils.stages import generation_length, test_examples

    model, tokenizer, config = load_trained(args.run_dir)
    config = config.replace(run_dir=str(args.run_dir))
    descriptions, references = test_examples(config)
    tokens = generation_length(config, tokenizer)
    rows = {}
    for name, (penalty, ngram) in SETTINGS.items():
        for label, adapter_off in (("fine-tuned", False), ("base", True)):
            def run():
                return generate_pages(model, tokenizer, descriptions, tokens, config.generation_batch_size,
                                      repetition_penalty=penalty, no_repeat_ngram_size=ngram)

            if adapter_off:
                with model.disable_adapter():
                    result = run()
            else:
                result = run()
            pages = result.pages
            rows[f"{name} / {label}"] = {
                "valid_html": float(np.mean([is_valid_html(p) for p in pages])),
                "ends_with_html": float(np.mean([ends_with_html(p) for p in pages])),
                "runaway": float(np.mean([repetition(p)["runaway"] for p in pages])),
                "cut_for_repetition": result.endings.count("repetition"),
                "description_coverage": float(np.mean([description_coverage(d, p) for d, p in zip(descriptions, pages)])),
                "tree_edit_similarity": float(np.mean([tree_edit_similarity(p, r) for p, r in zip(pages, references)])),
                "seconds": round(result.seconds, 1)}
            print(name, label, rows[f"{name} / {label}"], flush=True)
    report = {"run_dir": str(args.run_dir), "dataset": config.dataset, "test_pages": len(descriptions),
              "max_new_tokens": tokens, "rows": rows}
    write_report(report, Path(args.out or "/tmp"), "repetition_settings.json")
    return report


if __name__ == "__main__":
    main()
