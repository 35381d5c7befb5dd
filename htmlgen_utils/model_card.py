"""The model card: a README.md in the hub's format beside every saved adapter and merged model, so whoever finds the
weights (on the hub, on Drive, in a GGUF's folder) learns what they are, how to prompt them and how good they are.

It is written when training saves the adapter, and written again when notebook 05 has scored the model, with the
evaluation table and two generated pages; every figure is read from the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .packing import build_prompt

# the license a hub base model is published under, by id prefix; anything else points the reader at the base's card
BASE_LICENSES = {
    "meta-llama/Llama-2": "llama2",
    "NousResearch/Llama-2": "llama2",
    "meta-llama/Meta-Llama-3-": "llama3",
    "meta-llama/Llama-3.1": "llama3.1",
    "meta-llama/Llama-3.2": "llama3.2",
    "Qwen/Qwen2.5": "apache-2.0",
    "mistralai/Mistral-7B": "apache-2.0",
}
CARD_METRICS = {  # metrics.json key: what the table calls it
    "rougeL": "ROUGE-L (markup)",
    "tree_bleu": "TreeBLEU (DOM subtrees)",
    "html_valid_rate": "valid HTML (share)",
    "description_coverage": "description words on the page",
    "block_match": "layout: text blocks matched",
    "eval_loss": "test loss (teacher-forced)",
}


def base_license(model_id: str) -> str:
    return next((lic for prefix, lic in BASE_LICENSES.items() if model_id.startswith(prefix)), "other")


def _read(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def training_facts(run_dir: Path) -> dict:
    """Steps, tokens seen, training seconds and the device, from the run's history and summary."""
    history = _read(run_dir / "history.json", [])
    steps = [h for h in history if "loss" in h]
    summary = _read(run_dir / "training_summary.json", {})
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "tokens": int(sum(h["tokens_per_s"] * h["seconds"] for h in steps)),
        "minutes": sum(h["seconds"] for h in steps) / 60,
        "device": summary.get("device", "not recorded"),
        "processes": summary.get("world_size", 1),
    }


def evaluation_table(metrics: dict) -> str:
    """Fine-tuned vs base, three decimals, for the metrics the card shows (those metrics.json has)."""
    base = metrics.get("base_model", {})
    rows = ["| metric | fine-tuned | base model |", "|---|---|---|"]
    for key, name in CARD_METRICS.items():
        if isinstance(metrics.get(key), (int, float)):
            base_value = f"{base[key]:.3f}" if isinstance(base.get(key), (int, float)) else "—"
            rows.append(f"| {name} (`{key}`) | {metrics[key]:.3f} | {base_value} |")
    return "\n".join(rows)


def card_text(run_dir: str | Path) -> str:
    """The card's markdown, YAML header included."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    config = Config.load(run_dir)
    facts = training_facts(run_dir)
    hub_base = not Path(config.model_id).exists()
    base_name = config.model_id if hub_base else Path(config.model_id).name  # no path of this machine
    data = ModelCardData(
        base_model=config.model_id if hub_base else None,
        library_name="peft",
        license=base_license(config.model_id),
        tags=["htmlgen", "qlora", "lora", "html", "text-generation"],
        datasets=[config.dataset] if "/" in config.dataset and not Path(config.dataset).exists() else None,
        pipeline_tag="text-generation",
    )
    metrics = _read(run_dir / "metrics.json", {})
    pages = _read(run_dir / "eval_table.json", [])[:2]
    lines = [
        f"# HTML from a description: a QLoRA fine-tune of `{base_name}`",
        "",
        "A LoRA adapter trained with htmlgen's QLoRA notebooks on 4-bit (NF4) weights to write a whole HTML page "
        "from a plain-English description.",
        "",
        "## Training",
        "",
        "| preset | steps | tokens seen | training time | device | LoRA |",
        "|---|---|---|---|---|---|",
        f"| `{config.preset}` | {facts['steps']} | {facts['tokens']:,} | {facts['minutes']:.1f} min | "
        f"{facts['device']} × {facts['processes']} | r {config.lora_r}, α {config.lora_alpha}, "
        f"dropout {config.lora_dropout} |",
        "",
        f"Data: `{config.dataset}`; block of {config.block_size} tokens, learning rate {config.learning_rate}, "
        f"precision {config.precision}. The full settings are in `htmlgen_config.json`.",
        "",
        "## Prompt",
        "",
        "The model was trained on this template (not a chat template); the page follows `### Response:`:",
        "",
        "```text",
        build_prompt("{description}").rstrip("\n"),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += [
            f"On {metrics.get('examples', '?')} held-out descriptions (`{metrics.get('eval_split', 'test')}` split), "
            "greedy decoding:",
            "",
            evaluation_table(metrics),
            "",
        ]
        for number, row in enumerate(pages, 1):
            lines += [
                f"Generated page {number}, for “{row['description']}”:",
                "",
                "````html",
                row["generated"],
                "````",
                "",
            ]
    else:
        lines += ["Not evaluated yet: notebook 05 (or `python -m htmlgen_utils.pipeline`) writes the scores here.", ""]
    lines += [
        "## Limitations",
        "",
        "- Trained on few pages of one kind of data: expect its layouts, not the open web's variety.",
        "- ROUGE-L and TreeBLEU compare markup with one reference page; a good page unlike the reference scores low. "
        "The layout scores compare rendered text blocks, not how a page looks to a person.",
        "- Generated HTML is untrusted: render it in a sandbox (no scripts, no network).",
    ]
    # not a Jinja template: a generated page may contain "{{"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_model_card(run_dir: str | Path, folder: str | Path) -> Path:
    """`folder/README.md` from the run's files (replacing peft's empty template)."""
    path = Path(folder) / "README.md"
    path.write_text(card_text(run_dir))
    return path
