"""The stages as whole steps over a run directory: what the notebooks call, and what runs headless.

Each stage reads the previous stage's artifacts from `config.run_dir` and writes its own there:
01 -> data/*.jsonl, 02 -> packed/, 04 -> adapter/, history.json, 05 -> metrics.json, eval_table.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .data import DataReport, load_saved_splits, load_splits, save_splits
from .evaluation import score_pages, write_metrics
from .generation import generate_pages
from .levers import wants_compiled_decode
from .loss import evaluate_blocks
from .model import load_tokenizer, load_trained
from .packing import PackingStats, load_packed, pack_splits, save_packed
from .tracking import log_eval_table


def prepare_data(config: Config) -> tuple[DataReport, dict[str, PackingStats]]:
    """Notebooks 01 + 02 in one call: load, validate, split, save; tokenise, pack, save."""
    splits, report = load_splits(config)
    save_splits(splits, report, config.run_dir)
    tokenizer = load_tokenizer(config.model_id)
    packed, stats = pack_splits(splits, tokenizer, config)
    save_packed(packed, stats, config.run_dir)
    config.save(config.run_dir)
    return report, stats


def test_descriptions(config: Config) -> tuple[list[str], list[str]]:
    """The held-out test split's descriptions and reference pages (never the validation split)."""
    test = load_saved_splits(config.run_dir)["test"]
    test = test.select(range(min(config.max_test_examples, len(test))))
    return list(test["label"]), list(test["html"])


def evaluate_run(config: Config, compare_base: bool = True, visual: bool = False) -> dict:
    """Notebook 05's measurements: generate for the test descriptions with the fine-tuned model (and, for
    comparison, the same base with the adapter switched off), score everything, write metrics.json."""
    run_dir = Path(config.run_dir)
    model, tokenizer, trained_config = load_trained(run_dir)
    descriptions, references = test_descriptions(config)

    def generate_and_score():
        result = generate_pages(model, tokenizer, descriptions, trained_config.max_new_tokens,
                                trained_config.generation_batch_size,
                                compile_decode=wants_compiled_decode(model, trained_config))
        table, summary = score_pages(descriptions, result.pages, references, visual=visual)
        return result, table, summary

    generation, table, summary = generate_and_score()
    device = next(model.parameters()).device
    test_blocks = load_packed(run_dir)["test"]
    teacher_forced = evaluate_blocks(model, test_blocks, trained_config, device)
    metrics = {**summary, "eval_loss": teacher_forced["eval_loss"],
               "token_accuracy": teacher_forced["eval_token_accuracy"], "eval_split": "test",
               "generation": generation.summary()}
    history_file = run_dir / "history.json"
    if history_file.exists():
        evals = [h for h in json.loads(history_file.read_text()) if "eval_loss" in h]
        if evals:
            metrics["validation_loss"] = evals[-1]["eval_loss"]
    base_table = None
    if compare_base:
        with model.disable_adapter():
            _, base_table, base_summary = generate_and_score()
            base_forced = evaluate_blocks(model, test_blocks, trained_config, device)
        metrics["base_model"] = {**base_summary, "eval_loss": base_forced["eval_loss"],
                                 "token_accuracy": base_forced["eval_token_accuracy"]}
    write_metrics(run_dir, metrics)
    table.to_json(run_dir / "eval_table.json", orient="records", indent=1)
    if base_table is not None:
        base_table.to_json(run_dir / "eval_table_base.json", orient="records", indent=1)
    log_eval_table(trained_config, table, metrics)
    return {"metrics": metrics, "table": table, "base_table": base_table, "model": model, "tokenizer": tokenizer}
