"""What the notebooks share: the parameters cell turned into a `Config` (on Colab: the run directory on Google
Drive), the prerequisites checklist, small display helpers, and time estimates."""

from __future__ import annotations

import inspect
from pathlib import Path

from . import colab
from .colab import drive_run_dir, on_colab
from .config import Config, choose_preset


def describe_gpu() -> str:
    """One line: the GPU, its compute capability and memory, or that there is none."""
    import torch

    if not torch.cuda.is_available():
        return "GPU: none (CPU only)"
    major, minor = torch.cuda.get_device_capability(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"GPU: {torch.cuda.get_device_name(0)}, compute capability {major}.{minor}, {memory:.1f} GiB"


GPU_PRESETS = ("colab-t4", "colab-t4-low-memory", "ampere-bf16")


def setup(
    preset: str = "auto",
    run_dir: str = "runs/notebooks",
    dataset: str = "bundled",
    overrides: dict | None = None,
    use_drive: bool = True,
    needs_gpu: bool = False,
) -> Config:
    """The run's `Config` from a notebook's parameters, saying what it chose and why.

    The run's settings live in one place: the run directory's `htmlgen_config.json`, written by the first notebook
    that runs there. Later notebooks read it (`preset="auto"`, or the same preset) and apply only their own
    `overrides` on top, so 02-05 need no settings repeated. Without it, `preset="auto"` picks what fits this
    machine (`choose_preset`): `colab-t4` below compute capability 8.0 (a T4) and on a Colab CPU runtime,
    `ampere-bf16` from 8.0, `tiny` without a GPU elsewhere. On Colab with `use_drive`, a relative `run_dir` moves to
    Google Drive (`MyDrive/htmlgen/<name>`), so the next notebook (its own runtime) and a later session find it.
    `needs_gpu` (notebooks 03-05) stops a GPU preset on a runtime without one, saying how to get one."""
    import torch

    print(describe_gpu())
    if on_colab() and use_drive:
        run_dir = drive_run_dir(run_dir)
        print(f"run directory on Google Drive: {run_dir}")
    elif on_colab():
        print(
            f"run directory {run_dir} is on this runtime's disk: it is lost on disconnect, and the other notebooks "
            f"(each its own runtime) will not see it. Set use_drive = True to keep it on Google Drive."
        )
    saved_file = Path(run_dir).expanduser() / "htmlgen_config.json"
    saved = Config.load(saved_file) if saved_file.exists() else None
    if saved is not None and preset in ("auto", saved.preset):
        config = saved.replace(run_dir=run_dir, **(overrides or {}))
        print(
            f"settings: the run directory's htmlgen_config.json (preset {saved.preset!r}, dataset {saved.dataset!r})"
            + (f" with this notebook's overrides {sorted(overrides)}" if overrides else "")
        )
        if dataset != saved.dataset and dataset != "bundled":
            print(
                f"  (this notebook's dataset {dataset!r} is not used: the run was made from {saved.dataset!r}; "
                f"use another run_dir for another dataset)"
            )
    else:
        chosen = preset
        if preset == "auto":
            chosen, why = choose_preset()
            print(f"preset 'auto' -> {chosen!r}: {why}")
        else:
            print(f"preset {chosen!r} (as set in the parameters)")
        if saved is not None:
            print(
                f"  (the run directory was set up with preset {saved.preset!r}: this notebook uses {chosen!r}, and "
                f"its data must be prepared again if the tokenizer or blocks differ)"
            )
        config = Config.from_preset(chosen, run_dir=run_dir, dataset=dataset, **(overrides or {}))
        if saved is None:
            config.save(saved_file)  # the next notebooks read these settings
    if needs_gpu and config.preset in GPU_PRESETS and not torch.cuda.is_available():
        raise RuntimeError(
            f"This notebook needs a GPU for the {config.preset!r} preset and this runtime has none: "
            f"Runtime -> Change runtime type -> T4 GPU -> Save, then run all again (the run directory "
            f"keeps notebooks 01-02's work)."
        )
    return config


def checklist(config: Config) -> list[str]:
    """What the series needs before it starts, one line each with what to do when it is missing: a GPU runtime,
    access to the base model, and a run directory that outlives the runtime."""
    import torch

    from .model import UNGATED_COPY, hf_token

    lines = []
    if torch.cuda.is_available():
        lines.append(f"ok    {describe_gpu()}")
    elif on_colab():
        lines.append(
            "TODO  no GPU in this runtime: fine for notebooks 01-02; for 03-05 Runtime -> Change runtime type "
            "-> T4 GPU -> Save, then run all"
        )
    else:
        lines.append("ok    no GPU: the tiny CPU preset runs (a 4M-parameter model, minutes)")
    if Path(config.model_id).expanduser().exists():
        lines.append(f"ok    base model: the local folder {config.model_id}")
    elif hf_token():
        lines.append(f"ok    base model {config.model_id}: a Hugging Face token is set (HF_TOKEN)")
    elif config.model_id.startswith("meta-llama/"):
        lines.append(
            f"TODO  {config.model_id} is gated: accept its licence on huggingface.co and add a Colab secret "
            f'HF_TOKEN (key icon, allow this notebook), or set overrides={{"model_id": "{UNGATED_COPY}"}}'
        )
    else:
        lines.append(f"ok    base model {config.model_id} (downloaded from the hub, no token needed if public)")
    if on_colab() and not str(config.run_dir).startswith(colab.DRIVE_MOUNT_POINT):
        lines.append(
            "TODO  the run directory is not on Google Drive: set use_drive = True, or the work is lost on "
            "disconnect and notebooks 02-05 (their own runtimes) cannot see it"
        )
    else:
        lines.append(
            f"ok    run directory: {Path(config.run_dir).resolve()}" + (" (Google Drive)" if on_colab() else "")
        )
    lines.append(
        "info  notebooks 01 and 02 need no GPU (a CPU runtime keeps your GPU quota for 03-05); 03, 04 and 05 "
        "each need a GPU runtime (a T4 on Colab's free tier) with the same run_dir"
    )
    for line in lines:
        print(line)
    return lines


def show_source(*functions) -> None:
    """Print the source of package functions, so the notebook shows the very code it runs (links to files do not
    work on Colab)."""
    for function in functions:
        print(inspect.getsource(function))


def config_table(
    config: Config,
    fields: tuple[str, ...] = (
        "preset",
        "model_id",
        "dataset",
        "precision",
        "block_size",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "max_steps",
        "lora_r",
        "lora_alpha",
        "run_dir",
    ),
):
    import pandas as pd

    return pd.DataFrame({"value": [str(getattr(config, f)) for f in fields]}, index=list(fields))


def compare_table(
    metrics: dict,
    keys: tuple[str, ...] = (
        "rouge1",
        "rouge2",
        "rougeL",
        "text_rougeL",
        "html_valid_rate",
        "html_well_formed_rate",
        "tag_similarity",
        "tree_bleu",
        "tree_edit_similarity",
        "block_match",
        "text_similarity",
        "position_similarity",
        "color_similarity",
        "renders_non_blank_rate",
        "clip",
        "description_coverage",
        "follows_description",
        "kind_right_rate",
        "brand_right_rate",
        "scheme_right_rate",
        "components_present_rate",
        "distinct_pages",
        "pairwise_similarity",
        "ends_with_html_rate",
        "runaway_repetition_rate",
        "token_accuracy",
        "eval_loss",
    ),
):
    """Fine-tuned vs the same base without the adapter, side by side."""
    import pandas as pd

    base = metrics.get("base_model", {})
    keys = [k for k in keys if k in metrics or k in base]  # the layout scores exist only where Chromium does
    return (
        pd.DataFrame(
            {"fine-tuned": [metrics.get(k) for k in keys], "base model": [base.get(k) for k in keys]}, index=keys
        )
        .astype(float)
        .round(4)
    )


# An assumption, not a measurement: a T4 peaks at 65 TFLOP/s in fp16; 4-bit dequantisation, LoRA's small matmuls
# and memory-bound kernels keep QLoRA training near a third of that.
T4_SUSTAINED_TFLOPS = 20.0


def estimate_training_time(
    config: Config,
    train_blocks: int,
    base_parameters: int,
    tflops: float = T4_SUSTAINED_TFLOPS,
    recompute_saved: float = 0.0,
    layers: int = 0,
    hidden: int = 0,
) -> dict:
    """An estimate, with its arithmetic printed: FLOPs per token x tokens per step / a stated GPU throughput.

    Per token, training a frozen base with LoRA costs about 6 x N FLOPs for N base parameters: the forward pass
    (2N), its recomputation under gradient checkpointing (2N), and the backward pass through the frozen weights
    (2N; no weight gradients, LoRA's are tiny). Attention adds 4 x layers x hidden x block FLOPs a pass (the
    scores QK^T and their product with V, over every key of the block: with the block mask a T4's SDPA kernel
    computes the masked-out pairs too), 4 passes (forward, recompute, backward twice): about a fifth more at
    4,096 tokens for Llama-2-7B. Given `layers` and `hidden` (the model's), it is counted. `recompute_saved` is the
    share of those FLOPs the memory plan removes (`levers.memory_plan(model).recompute_saved`)."""
    from .train import plan_steps

    accumulation, steps_per_epoch, total_steps = plan_steps(train_blocks, config)
    tokens_per_step = accumulation * config.micro_batch_size * config.block_size
    attention = 4 * 4 * layers * hidden * config.block_size
    flops_per_token = (6 * base_parameters + attention) * (1 - recompute_saved)
    seconds_per_step = tokens_per_step * flops_per_token / (tflops * 1e12)
    estimate = {
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "attention_flops_per_token": attention,
        "assumed_tflops": tflops,
        "seconds_per_step": seconds_per_step,
        "steps_per_epoch": steps_per_epoch,
        "minutes_per_epoch": seconds_per_step * steps_per_epoch / 60,
        "planned_steps": total_steps,
        "minutes_planned": seconds_per_step * total_steps / 60,
    }
    saved = f" x (1 - {recompute_saved:.0%} recompute the memory plan removes)" if recompute_saved else ""
    attended = f" + attention 16 x {layers} x {hidden} x {config.block_size}" if attention else ""
    print(
        f"estimate: (6 x {base_parameters:,} parameters{attended}){saved} = {flops_per_token:.2e} FLOPs a token; a "
        f"step is {accumulation} x {config.micro_batch_size} x {config.block_size} = {tokens_per_step:,} tokens -> "
        f"{tokens_per_step * flops_per_token:.2e} FLOPs; at an assumed {tflops:g} TFLOP/s (a T4 sustains about a "
        f"third of its 65 TFLOP/s fp16 peak) that is ~{seconds_per_step:.0f} s a step, ~"
        f"{estimate['minutes_per_epoch']:.0f} min an epoch ({steps_per_epoch} steps), ~"
        f"{estimate['minutes_planned']:.0f} min for the {total_steps} planned steps"
    )
    return estimate


def training_report(history: list[dict], seconds: float) -> dict:
    """What the run cost: wall time, training tokens/s (median over steps), peak GPU memory, skipped steps."""
    import statistics

    import torch

    steps = [h for h in history if "loss" in h]
    report = {
        "optimiser_steps": len(steps),
        "wall_minutes": round(seconds / 60, 2),
        "median_tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in steps), 1) if steps else None,
        "skipped_steps": sum(bool(h["skipped"]) for h in steps),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    print(", ".join(f"{k} {v}" for k, v in report.items()))
    return report


QUICK_EXAMPLES, QUICK_TOKENS = 8, 768  # notebook 05's quick evaluation (the default on a T4)


def evaluation_settings(config: Config, tokenizer, quick_evaluation: str = "auto") -> tuple[Config, bool]:
    """The run's config for notebook 05 with its generation length resolved (`stages.generation_length`), made
    quick (8 test prompts, pages of up to 768 tokens) when asked, or by default on a T4, where a full evaluation of
    32 whole pages from two models takes much longer."""
    from .stages import generation_length

    if quick_evaluation not in ("auto", "on", "off"):
        raise ValueError(f"quick_evaluation={quick_evaluation!r}: use 'auto', 'on' or 'off'")
    config = config.replace(max_new_tokens=generation_length(config, tokenizer))
    quick = quick_evaluation == "on" or (quick_evaluation == "auto" and config.preset.startswith("colab-t4"))
    if quick and config.max_test_examples <= QUICK_EXAMPLES and config.max_new_tokens <= QUICK_TOKENS:
        quick = False  # already that small: nothing is left out
    if quick:
        config = config.replace(
            max_test_examples=min(config.max_test_examples, QUICK_EXAMPLES),
            max_new_tokens=min(config.max_new_tokens, QUICK_TOKENS),
        )
    return config, quick


SCRAPED_DATA_ADVICE = (
    "These look like scraped pages. Keep `page_cleaning` at safe (or try aggressive) and `drop_unteachable` on, "
    "and train as the `tiny-long` preset does (examples of the model's whole context, `long_page_policy` "
    "truncate_close), with twice its steps for a few dozen rows: -p max_steps 256 (README: Real scraped pages)."
)


def triage_table(config: Config, tokenizer, examples: int = 2, sample: int = 200):
    """Notebook 01's look at the raw rows: how many triage flags (`cleaning.triage`) and for which reasons, up to
    `examples` flagged pages rendered (sandboxed), and the median tokens of up to `sample` pages under each
    cleaning policy. Says what to do when the rows look scraped. Returns the per-policy token table."""
    import statistics

    import pandas as pd
    from IPython.display import HTML, display

    from .cleaning import CLEANING, clean_markup, triage, triage_counts
    from .data import load_clean_rows
    from .rendering import page_card

    rows, _ = load_clean_rows(config)
    results = [triage(row["label"], row["html"]) for row in rows]
    counts = triage_counts(results)
    print(f"{len(rows)} rows; flagged: {counts or 'none'}")
    flagged = [(row, result) for row, result in zip(rows, results) if result.reasons][:examples]
    for row, result in flagged:
        reasons = "; ".join(f"{flag}: {why}" for flag, why in result.reasons.items())
        display(HTML(page_card(row["html"], heading=f"{row['label'][:80]} ({reasons})", height=200)))
    pages = [row["html"] for row in rows.select(range(min(sample, len(rows))))]
    medians = {
        p: statistics.median(len(tokenizer(clean_markup(page, p)).input_ids) for page in pages) for p in CLEANING
    }
    if any(flag in counts for flag in ("challenge page", "consent wall", "empty render", "script-dominated")) or (
        medians["safe"] < 0.9 * medians["none"]
    ):
        print(SCRAPED_DATA_ADVICE)
    return pd.DataFrame({"median tokens a page": medians}).T
