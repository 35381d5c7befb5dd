"""The run directory between stages: what each notebook reads, rebuilt when it is cheap, named when it is not.

01 -> data/*.jsonl, 02 -> packed/, 04 -> adapter/, history.json, 05 -> metrics.json, eval_table*.json.
On Colab every notebook runs in its own runtime with only the run directory (on Google Drive) in common, so a
notebook never assumes the one before ran in this process: splits and packed blocks are rebuilt when missing
(seconds to minutes), while a missing adapter (the longest stage: training) stops it with what to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from .config import Config
from .data import DataReport, load_saved_splits, load_splits, save_splits
from .evaluation import write_metrics
from .model import load_tokenizer
from .model_card import write_model_card
from .packing import PackingStats, load_packed, pack_splits, packing_fingerprint, packing_mismatch, save_packed
from .tracking import log_eval_table


def prepare_data(config: Config) -> tuple[DataReport, dict[str, PackingStats]]:
    """Notebooks 01 + 02 in one call: load, validate, split, save; tokenise, pack, save."""
    splits, report = load_splits(config)
    save_splits(splits, report, config.run_dir)
    tokenizer = load_tokenizer(config.model_id)
    packed, stats = pack_splits(splits, tokenizer, config)
    save_packed(packed, stats, config.run_dir, packing_fingerprint(config, tokenizer))
    config.save(config.run_dir)
    return report, stats


def ensure_splits(config: Config) -> datasets.DatasetDict:
    """The run's saved splits; made again from `config.dataset` (what notebook 01 does) when there are none."""
    report_file = Path(config.run_dir) / "data" / "report.json"
    if not report_file.exists():
        print(
            f"No splits in {Path(config.run_dir) / 'data'}: making them from {config.dataset!r}, as notebook 01 does."
        )
        splits, report = load_splits(config)
        save_splits(splits, report, config.run_dir)
        return splits
    source = json.loads(report_file.read_text()).get("source")
    if source != config.dataset:
        raise ValueError(
            f"The splits in {config.run_dir} were made from dataset {source!r}, but this notebook's "
            f"dataset is {config.dataset!r}: set dataset={source!r}, run notebook 01 again with the new "
            f"dataset, or use another run_dir."
        )
    return load_saved_splits(config.run_dir)


def ensure_packed(config: Config, tokenizer) -> datasets.DatasetDict:
    """The run's packed blocks, checked against this config's packing settings and tokenizer; packed again (what
    notebook 02 does) when there are none."""
    fingerprint = packing_fingerprint(config, tokenizer)
    if not (Path(config.run_dir) / "packed" / "dataset_dict.json").exists():
        print(f"No packed blocks in {Path(config.run_dir) / 'packed'}: packing them now, as notebook 02 does.")
        packed, stats = pack_splits(ensure_splits(config), tokenizer, config)
        save_packed(packed, stats, config.run_dir, fingerprint)
        return packed
    mismatch = packing_mismatch(config.run_dir, fingerprint)
    if mismatch:
        raise ValueError(
            f"The blocks in {Path(config.run_dir) / 'packed'} were packed with other settings than this "
            f"notebook's ({mismatch}). Run notebook 02 again with the same parameters as this one (it "
            f"packs anew), or use another run_dir."
        )
    return load_packed(config.run_dir)


def test_examples(config: Config) -> tuple[list[str], list[str]]:
    """The held-out test split's descriptions and reference pages (never the validation split), at most
    `max_test_examples` of them."""
    test = ensure_splits(config)["test"]
    test = test.select(range(min(config.max_test_examples, len(test))))
    return list(test["label"]), list(test["html"])


GENERATION_MARGIN = 32  # tokens beyond the longest kept page, so a page as long as that one can still end


def generation_length(config: Config, tokenizer) -> int:
    """`config.max_new_tokens`, or when it is 0 (auto) at least the longest page the run kept for training, in
    tokens, plus a margin, never more than `max_example_tokens` (what training showed the model, and what memory
    was sized for): a model trained on whole pages gets room to finish one."""
    if config.max_new_tokens > 0:
        return config.max_new_tokens
    splits = ensure_splits(config)
    pages = [page for name in ("train", "test") for page in splits[name]["html"][:2000]]
    longest = max(len(ids) for ids in tokenizer(pages, add_special_tokens=False).input_ids)
    return min(longest + GENERATION_MARGIN, config.max_example_tokens)


SMALL_TEST_SPLIT = 20


def small_data_warning(test_examples: int) -> str | None:
    """A warning when the test split is too small for its scores to mean much, with what to do."""
    if test_examples >= SMALL_TEST_SPLIT:
        return None
    return (
        f"Only {test_examples} test example(s): with fewer than {SMALL_TEST_SPLIT} the scores are mostly noise "
        f"(one page moves a rate by {1 / max(test_examples, 1):.0%}). Raise test_fraction (e.g. overrides="
        f'{{"test_fraction": 0.2}}) or bring more data; say so when you report them.'
    )


def collect_metrics(
    summary: dict,
    teacher_forced: dict,
    generation: dict,
    run_dir: str | Path,
    base_summary: dict | None = None,
    base_teacher_forced: dict | None = None,
) -> dict:
    """metrics.json's content: the page scores, the test split's teacher-forced loss and accuracy, the
    generation figures, the last validation loss of training, and the base model's scores beside them."""
    metrics = {
        **summary,
        "eval_loss": teacher_forced["eval_loss"],
        "token_accuracy": teacher_forced["eval_token_accuracy"],
        "eval_split": "test",
        "generation": generation,
    }
    history_file = Path(run_dir) / "history.json"
    if history_file.exists():
        evals = [h for h in json.loads(history_file.read_text()) if "eval_loss" in h]
        if evals:
            metrics["validation_loss"] = evals[-1]["eval_loss"]
    if base_summary is not None:
        metrics["base_model"] = {**base_summary}
        if base_teacher_forced is not None:
            metrics["base_model"].update(
                eval_loss=base_teacher_forced["eval_loss"], token_accuracy=base_teacher_forced["eval_token_accuracy"]
            )
    return metrics


def save_evaluation(config: Config, metrics: dict, table, base_table=None) -> Path:
    """metrics.json and the per-page tables in the run directory (and to wandb when it is on)."""
    run_dir = Path(config.run_dir)
    path = write_metrics(run_dir, metrics)
    table.to_json(run_dir / "eval_table.json", orient="records", indent=1, force_ascii=False)
    if base_table is not None:
        base_table.to_json(run_dir / "eval_table_base.json", orient="records", indent=1, force_ascii=False)
    log_eval_table(config, table, metrics)
    for folder in (run_dir / "adapter", run_dir / "merged"):  # the cards now carry the scores
        if folder.is_dir():
            write_model_card(run_dir, folder)
    return path
