"""Training throughput and memory, side by side: the seed-style loop, TRL's SFTTrainer, and ours.

    PYTHONPATH=$PWD python bench/train_compare.py --out $OUT --systems seed-style,ours --blocks 2048,4096
        # one H200 (or any CUDA GPU): 3 interleaved repeats, ~7 minutes; every system and block takes far longer
    PYTHONPATH=$PWD python bench/train_compare.py --smoke --out /tmp/bench   # CPU, tiny model: checks the script

All systems train the same random-weight Llama-2-7B-shaped checkpoint on the bundled data packed into the same
blocks, with the same recipe: NF4 double-quant 4-bit base, LoRA r16/a64/dropout 0.05 on every linear layer,
paged 8-bit AdamW at 2e-4, fp16 autocast + GradScaler, gradient checkpointing, micro-batch 1, accumulation 4,
under a T4's 15 GiB (`torch.cuda.set_per_process_memory_fraction`):

- `seed-style`: transformers + PEFT + bitsandbytes in a plain, correct loop the way the original wrote it
  (`prepare_model_for_kbit_training` defaults, `model(input_ids, labels=input_ids).loss`, `loss.item()` each
  micro-batch, model in train mode);
- `trl`: TRL's `SFTTrainer` with packing (its own best-fit packing of the same tokenised examples);
- `unsloth`: Unsloth's 4-bit load, LoRA and `"unsloth"` checkpointing in the seed-style loop, in its own process
  with `--unsloth-path` first on its path (it pins older transformers and trl); `unsloth-dropout-0` the same with
  LoRA dropout 0, the only setting where its fused LoRA kernels run;
- `ours`: the `colab-t4` preset through `htmlgen_utils.train.train` (the loop notebook 04 runs), and the same
  with one lever switched the other way each (`LEVERS`, at the blocks named there), to show what each bought;
- `ours bf16`: the `ampere-bf16` preset at its own micro-batch, without the memory cap.

Each run of a system is its own process (clean peaks; an out-of-memory cannot spoil the next one), and the
systems run `--repeats` times interleaved (seed-style, ours, low-memory, seed-style, ours, ...), so the shared
GPU's drift touches all alike. Per block: one optimiser step of warm-up (which also compiles), then `--steps`
measured (one for blocks >= 8192); a run's tokens/s is the median over its measured optimiser steps of (tokens in
the step) / (wall time of the step, synchronised). `summary` gives, per system and block, the median and min-max
over the repeats and the ratio of medians. Peak is `torch.cuda.max_memory_allocated` over load + training. Prints
one JSON table last and writes it to --out.

- `low-memory`: the `colab-t4-low-memory` preset (every layer checkpointed, checkpoints offloaded to CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import (
    REPO,
    T4_GIB,
    T4_USABLE_GIB,
    build_checkpoint,
    cap_memory,
    free_memory,
    peak_gib,
    reset_peak,
    sync,
    versions,
    write_report,
)

BLOCKS = (1024, 2048, 4096, 8192, 16384, 32768)
LEVERS = {  # each lever switched the other way, as Config overrides, and the blocks where that is measured
    "layers not compiled (compile_training=false)": ({"compile_training": False}, (2048, 4096)),
    "checkpoints kept on the GPU (offload_activations=off)": ({"offload_activations": "off"}, (2048, 16384)),
    "whole-block logits (loss_chunk_tokens=0)": ({"loss_chunk_tokens": 0}, (2048,)),
    "fp32 embeddings/head (embeddings_in_compute_dtype=false)": ({"embeddings_in_compute_dtype": False}, (2048,)),
    "per-example attention (packed_attention=on)": ({"packed_attention": "on"}, (2048,)),
}


# ---------------------------------------------------------------------------------------------- data
def example_tokens(block_size: int, as_t4: bool) -> int:
    """The longest example kept whole: the `colab-t4` preset's (the block) with `--as-t4`, else up to 2,048."""
    return block_size if as_t4 else min(block_size, 2048)


def data_dir_for(work: Path, block_size: int, as_t4: bool) -> Path:
    return work / f"data-{block_size}{'-t4' if as_t4 else ''}"


def blocks_for(block_size: int, model_path: str, work: Path, as_t4: bool = False) -> Path:
    """The bundled data packed by our code into `block_size` blocks; every system reads these."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.stages import prepare_data

    run_dir = data_dir_for(work, block_size, as_t4)
    if not (run_dir / "packed" / "dataset_dict.json").exists():
        prepare_data(
            Config.from_preset(
                "colab-t4",
                model_id=model_path,
                run_dir=str(run_dir),
                block_size=block_size,
                max_example_tokens=example_tokens(block_size, as_t4),
                wandb_mode="disabled",
            )
        )
    return run_dir


def run_as_t4() -> None:
    """This process as a T4 runs: our `auto` switches see compute capability 7.5 (so every path that has not run on
    a T4 stays off), and SDPA has only the kernels a T4 has (memory-efficient and math: no FlashAttention, no cuDNN
    attention). FlexAttention's `auto` already needs 8.0. The memory cap is set by the caller."""
    import htmlgen_utils.config as config_module

    config_module.gpu_capability = lambda: (7, 5)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def examples_in(blocks) -> list[list[int]]:
    """The tokenised examples inside packed blocks (split where the position ids restart; padding dropped)."""
    examples = []
    for ids, positions in zip(blocks["input_ids"], blocks["position_ids"]):
        current: list[int] = []
        for token, position in zip(ids, positions):
            if position == 0 and current:
                examples.append(current)
                current = []
            current.append(token)
        examples.append(current)
    return [e for e in examples if len(e) > 1]


def measured(step_records: list[tuple[int, float]], warmup: int) -> float:
    rates = [tokens / seconds for tokens, seconds in step_records[warmup:]]
    return round(statistics.median(rates), 1) if rates else float("nan")


# ---------------------------------------------------------------------------------------------- systems
def seed_style(model_path: str, data_dir: Path, block_size: int, steps: int, precision: str) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.float16 if precision == "fp16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        device_map={"": 0} if device == "cuda" else "cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    )
    model = prepare_model_for_kbit_training(model)  # its defaults: fp32 non-quantised weights, checkpointing
    torch.manual_seed(42)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=64, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules="all-linear"
        ),
    )
    return plain_loop(model, data_dir, block_size, steps, precision)


def plain_loop(model, data_dir: Path, block_size: int, steps: int, precision: str) -> dict:
    """The seed-style loop: each packed block one causal sequence, every token a label, 4 micro-batches a step."""
    import bitsandbytes as bnb

    from htmlgen_utils.packing import load_packed

    dtype = torch.float16 if precision == "fp16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = (bnb.optim.PagedAdamW8bit if device == "cuda" else bnb.optim.AdamW8bit)(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4
    )
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    blocks = load_packed(data_dir)["train"]
    model.train()
    records, losses, micro = [], [], 0
    sync()
    started = time.perf_counter()
    for step in range(steps):
        for _ in range(4):
            ids = torch.tensor([blocks[micro % len(blocks)]["input_ids"]], device=device)
            micro += 1
            with torch.autocast(device, dtype=dtype, enabled=precision == "fp16"):
                loss = model(input_ids=ids, labels=ids).loss / 4
            scaler.scale(loss).backward()
            losses.append(loss.item() * 4)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        now = time.perf_counter()
        records.append((4 * block_size, now - started))
        started = now
    return {"records": records, "final_loss": round(statistics.mean(losses[-4:]), 4)}


UNSLOTH_ENV = {  # offline, no telemetry, its compiled modules in /tmp (as its own docs say to run it without a hub)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
}


def unsloth_system(
    model_path: str, data_dir: Path, block_size: int, steps: int, precision: str, dropout: float
) -> dict:
    """Unsloth's own 4-bit load (NF4, double quant, fp16) and LoRA as `colab-t4` (r 16, alpha 64, all seven
    projections), its gradient checkpointing ("unsloth": offloaded to CPU), in the seed-style loop (its model
    attends causally over the whole block and trains on every token, as that loop does)."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=block_size,
        dtype=torch.float16,
        load_in_4bit=True,
        use_exact_model_name=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=64,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )
    FastLanguageModel.for_training(model)
    for parameter in model.parameters():  # fp32 LoRA weights, as the fp16 GradScaler needs (and ours keeps)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return plain_loop(model, data_dir, block_size, steps, precision)


def trl_sft(model_path: str, data_dir: Path, block_size: int, steps: int, precision: str) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from htmlgen_utils.model import load_tokenizer
    from htmlgen_utils.packing import load_packed

    dtype = torch.float16 if precision == "fp16" else torch.float32
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        device_map={"": 0} if on_gpu else "cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    )
    train = datasets.Dataset.from_dict({"input_ids": examples_in(load_packed(data_dir)["train"])})
    args = SFTConfig(
        output_dir=str(data_dir / "trl"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        fp16=precision == "fp16",
        bf16=False,
        optim="paged_adamw_8bit" if on_gpu else "adamw_torch",
        gradient_checkpointing=True,
        packing=True,
        max_length=block_size,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        include_num_input_tokens_seen=True,
        use_cpu=not on_gpu,
    )
    torch.manual_seed(42)
    lora = LoraConfig(
        r=16, lora_alpha=64, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules="all-linear"
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, peft_config=lora, processing_class=load_tokenizer(model_path)
    )
    for parameter in trainer.model.parameters():  # TRL leaves LoRA weights in half precision; GradScaler needs fp32
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    records, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.started, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            records.append((state.num_input_tokens_seen - self.tokens, time.perf_counter() - self.started))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Timer())
    trainer.train()
    return {"records": records, "final_loss": round(losses[-1], 4) if losses else None}


def ours(
    model_path: str, data_dir: Path, block_size: int, steps: int, preset: str, overrides: dict, as_t4: bool = False
) -> dict:
    from htmlgen_utils.config import Config
    from htmlgen_utils.levers import apply_training_levers
    from htmlgen_utils.model import load_for_training
    from htmlgen_utils.packing import load_packed
    from htmlgen_utils.train import train

    config = Config.from_preset(
        preset,
        model_id=model_path,
        run_dir=str(data_dir / f"ours-{preset}"),
        block_size=block_size,
        max_example_tokens=example_tokens(block_size, as_t4),
        max_steps=steps,
        eval_every=10_000,
        max_eval_batches=1,
        checkpoint_every=0,
        wandb_mode="disabled",
        warmup_steps=0,
        **overrides,
    )
    model, tokenizer = load_for_training(config)
    after_load = peak_gib()
    reset_peak()
    device = next(model.parameters()).device
    # the levers as for a long run (a run of a few steps would skip compiling; we measure steady steps)
    levers = apply_training_levers(model, config, device)
    state = train(model, tokenizer, load_packed(data_dir), config, config.run_dir, resume=False)
    steps_log = [h for h in state.history if "tokens_per_s" in h]
    return {
        "records": [(h["tokens_per_s"] * h["seconds"], h["seconds"]) for h in steps_log],
        "final_loss": round(steps_log[-1]["loss"], 4),
        "skipped_steps": state.skipped_steps,
        "micro_batch": config.micro_batch_size,
        "peak_load_gib": after_load,
        "peak_training_gib": peak_gib(),
        "levers": levers,
    }


# ---------------------------------------------------------------------------------------------- one process each
def worker(args: argparse.Namespace) -> None:
    """Run one system over the given blocks (ascending) in this process; print one JSON line per block."""
    if args.system == "unsloth":
        import unsloth  # noqa: F401  (it patches transformers and peft, so it comes first)
    cap_memory(None if args.uncapped or args.smoke else T4_USABLE_GIB if args.as_t4 else T4_GIB)
    if args.as_t4 and not args.smoke:
        run_as_t4()
    precision = "fp32" if args.smoke else "fp16"
    overrides = json.loads(args.overrides)
    preset = "tiny" if args.smoke else args.preset
    if args.smoke:
        overrides = {**overrides, "precision": "fp32"}
    for position, block in enumerate(int(b) for b in args.blocks.split(",")):
        steps = args.steps + 1 if block < 8192 else 2
        row = {"system": args.system, "block": block, "micro_batch": 1}
        data_dir = data_dir_for(Path(args.work), block, args.as_t4)
        free_memory()
        reset_peak()
        try:
            if args.system == "seed-style":
                result = seed_style(args.model, data_dir, block, steps, precision)
            elif args.system == "trl":
                result = trl_sft(args.model, data_dir, block, steps, precision)
            elif args.system == "unsloth":
                dropout = json.loads(args.overrides).get("lora_dropout", 0.05)
                result = unsloth_system(args.model, data_dir, block, steps, precision, dropout)
            else:
                result = ours(args.model, data_dir, block, steps, preset, overrides, args.as_t4)
            records = result.pop("records")
            peak = max(filter(None, (peak_gib(), result.get("peak_load_gib"))), default=None)
            row.update(
                tokens_per_s=measured(records, 1), peak_gib=peak, oom=False, measured_steps=len(records) - 1, **result
            )
        except torch.OutOfMemoryError:
            row.update(tokens_per_s=None, peak_gib=peak_gib(), oom=True)
        print("ROW " + json.dumps(row), flush=True)
        if row["oom"]:
            for larger in args.blocks.split(",")[position + 1 :]:
                print(
                    "ROW "
                    + json.dumps(
                        {
                            "system": args.system,
                            "block": int(larger),
                            "oom": True,
                            "note": f"not run: {block} already out of memory",
                        }
                    ),
                    flush=True,
                )
            return
        free_memory()


def run_worker(
    system: str,
    blocks: list[int],
    args: argparse.Namespace,
    model_path: Path,
    preset: str = "colab-t4",
    overrides: dict | None = None,
    uncapped: bool = False,
    label: str | None = None,
) -> list[dict]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--system",
        system,
        "--blocks",
        ",".join(map(str, blocks)),
        "--model",
        str(model_path),
        "--work",
        str(args.work),
        "--steps",
        str(args.steps),
        "--preset",
        preset,
        "--overrides",
        json.dumps(overrides or {}),
    ]
    command += ["--smoke"] if args.smoke else []
    command += ["--uncapped"] if uncapped else []
    command += ["--as-t4"] if args.as_t4 else []
    command += ["--unsloth-path", args.unsloth_path] if args.unsloth_path else []
    env = dict(os.environ)
    if system == "unsloth":  # its own process and path: it pins older transformers and trl than ours
        env.update(UNSLOTH_ENV, PYTHONPATH=os.pathsep.join(filter(None, [args.unsloth_path, env.get("PYTHONPATH")])))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    for row in rows:
        row["system"] = label or system
    if done.returncode != 0:
        rows.append({"system": label or system, "error": done.stderr[-3000:]})
    print(f"{label or system}: {time.perf_counter() - started:.0f} s", *map(json.dumps, rows), sep="\n", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per system and block over the repeats: median, min and max of tokens/s (each run's own median over its
    measured steps), the largest peak, and the ratio of medians against seed-style and TRL."""
    table: dict = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        for block in sorted({r["block"] for r in rows if r["system"] == system and "block" in r}):
            runs = [r for r in rows if r["system"] == system and r.get("block") == block]
            rates = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
            peaks = [r["peak_gib"] for r in runs if r.get("peak_gib")]
            table.setdefault(system, {})[str(block)] = {
                "runs": len(runs),
                "oom": sum(bool(r.get("oom")) for r in runs),
                "tokens_per_s_median": round(statistics.median(rates), 1) if rates else None,
                "tokens_per_s_min": min(rates, default=None),
                "tokens_per_s_max": max(rates, default=None),
                "peak_gib": max(peaks, default=None),
            }
    for system, blocks in table.items():
        for block, cell in blocks.items():
            for other in ("seed-style", "trl"):
                theirs = table.get(other, {}).get(block, {}).get("tokens_per_s_median")
                if theirs and cell["tokens_per_s_median"] and system != other:
                    cell[f"ratio_of_medians_vs_{other}"] = round(cell["tokens_per_s_median"] / theirs, 2)
    return table


def longest_blocks(rows: list[dict]) -> dict:
    """The longest block each system trained under the cap."""
    longest = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        fits = [r["block"] for r in rows if r["system"] == system and r.get("oom") is False]
        longest[system] = max(fits) if fits else None
    return {"longest_block_under_cap": longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    parser.add_argument("--systems", default="seed-style,trl,ours,low-memory,levers,bf16")
    parser.add_argument(
        "--levers", default="", help="run only the levers whose name contains one of these comma-separated texts"
    )
    parser.add_argument(
        "--variants", default="{}", help='more rows of ours: JSON {"label": {Config overrides}}, run at every --blocks'
    )
    parser.add_argument("--steps", type=int, default=4, help="measured optimiser steps for blocks below 8192")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved (A B C A B C ...)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short blocks: checks the script")
    parser.add_argument(
        "--unsloth-path", default="", help="a folder with unsloth, unsloth_zoo and trl<=1.15, first on its path"
    )
    parser.add_argument(
        "--as-t4",
        action="store_true",
        help="as a T4 runs colab-t4: its usable memory as the cap, compute capability 7.5 for our "
        "auto switches, SDPA without FlashAttention/cuDNN, whole examples up to the block",
    )
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="colab-t4", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--uncapped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    blocks = [int(b) for b in args.blocks.split(",")]
    systems = args.systems.split(",")
    model_path = build_checkpoint(args.work / "llama2-7b-shaped", smoke=args.smoke)
    for block in sorted(set(blocks + [2048])):
        blocks_for(block, str(model_path), args.work, args.as_t4)
    report = {
        **versions(),
        "memory_cap_gib": None if args.smoke else T4_USABLE_GIB if args.as_t4 else T4_GIB,
        "smoke": args.smoke,
        "as_t4": args.as_t4,
        "recipe": "NF4 double-quant, LoRA r16/a64/0.05 all linear, paged AdamW8bit 2e-4, fp16 autocast + "
        "GradScaler, gradient checkpointing, micro-batch 1, accumulation 4",
        "rows": [],
    }
    rows = report["rows"]
    for repeat in range(args.repeats):  # A B C, A B C, ...: the GPU's drift touches every system alike
        for system in ("seed-style", "trl", "unsloth", "unsloth-dropout-0", "ours", "low-memory"):
            if system in systems:
                preset = "colab-t4-low-memory" if system == "low-memory" else "colab-t4"
                worker_system = {"low-memory": "ours", "unsloth-dropout-0": "unsloth"}.get(system, system)
                overrides = {"lora_dropout": 0.0} if system == "unsloth-dropout-0" else None
                found = run_worker(
                    worker_system, blocks, args, model_path, preset=preset, overrides=overrides, label=system
                )
                rows += [{**row, "repeat": repeat} for row in found]
                report["summary"] = summarise(rows)
                write_report(report, args.out, "train_compare.json", quiet=True)  # partial results survive a timeout
    if "levers" in systems:
        for name, (overrides, lever_blocks) in LEVERS.items():
            if not any(part in name for part in args.levers.split(",")):
                continue
            lever_blocks = [b for b in lever_blocks if b in blocks] or blocks[:1]
            rows += run_worker("ours", lever_blocks, args, model_path, overrides=overrides, label=f"ours, {name}")
            write_report(report, args.out, "train_compare.json", quiet=True)
    for label, overrides in json.loads(args.variants).items():
        rows += run_worker("ours", blocks, args, model_path, overrides=overrides, label=f"ours, {label}")
        write_report(report, args.out, "train_compare.json", quiet=True)
    if "bf16" in systems:
        rows += run_worker(
            "ours", [2048], args, model_path, preset="ampere-bf16", uncapped=True, label="ours bf16 preset (uncapped)"
        )
    report["summary"] = summarise(rows)
    report.update(longest_blocks(rows))
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "train_compare.json")


if __name__ == "__main__":
    main()
