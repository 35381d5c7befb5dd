"""Measure the `colab-t4` preset on a Llama-2-7B-shaped model, with a T4's 15 GiB memory cap, on one GPU.

    python bench/colab_t4_on_h200.py --out $OUT            # prints one JSON table last, writes it to --out

Weights are random (the hub is out of reach here; values change neither speed nor memory): the script
builds a checkpoint with Llama-2-7B's config (vocab 32000, hidden 4096, MLP 11008, 32 layers, 32 heads)
and gives it the tiny base's tokenizer (ids < 32000, BOS 1 / EOS 2 like Llama's). Then, in one process:

1. training: the `colab-t4` preset through `htmlgen_utils` (the code notebook 04 and `htmlgen_utils.train`
   run: NF4 double-quant, LoRA r16/a64 on all linear layers, paged 8-bit AdamW, fp16 autocast + GradScaler,
   gradient checkpointing, accumulation 4) on the bundled data packed into the preset's blocks; tokens/s per
   optimiser step and peak allocated memory;
2. generation with the 4-bit model + LoRA: the original's way (one prompt at a time, 256 new tokens, no
   stop) against ours (`generate_pages`, batched; random weights never write `</html>`, so both produce the
   same 256 tokens a page and the difference is batching alone).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
T4_GIB = 15.0


def build_checkpoint(path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from htmlgen_utils.config import TINY_BASE_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    config = LlamaConfig(**LLAMA2_7B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def measure_training(model_path: Path, run_dir: Path, block_size: int, steps: int) -> dict:
    from htmlgen_utils.config import Config
    from htmlgen_utils.model import load_for_training
    from htmlgen_utils.packing import load_packed
    from htmlgen_utils.stages import prepare_data
    from htmlgen_utils.train import train

    config = Config.from_preset("colab-t4", model_id=str(model_path), run_dir=str(run_dir), block_size=block_size,
                                max_example_tokens=min(block_size, 2048), max_steps=steps, eval_every=10_000,
                                max_eval_batches=2, checkpoint_every=0, wandb_mode="disabled")
    prepare_data(config)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_for_training(config)
    after_load = torch.cuda.max_memory_allocated() / 2**30
    try:
        state = train(model, tokenizer, load_packed(run_dir), config, run_dir, resume=False)
    except torch.OutOfMemoryError:
        return {"block_size": block_size, "oom": True, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    steps_log = [h for h in state.history if "tokens_per_s" in h]
    result = {"block_size": block_size, "oom": False, "steps": len(steps_log),
              "median_tokens_per_s_after_warmup": round(statistics.median(h["tokens_per_s"] for h in steps_log[1:]), 1),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "peak_after_load_gib": round(after_load, 3),
              "final_loss": round(steps_log[-1]["loss"], 4), "skipped_steps": state.skipped_steps}
    del model, state
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_generation(model_path: Path, run_dir: Path, prompts: list[str], seed_style_prompts: int,
                       batches: tuple[int, ...] = (8, 16)) -> dict:
    from htmlgen_utils.config import Config
    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.model import load_for_training

    config = Config.from_preset("colab-t4", model_id=str(model_path), run_dir=str(run_dir))
    model, tokenizer = load_for_training(config)  # 4-bit base + (fresh) LoRA, unmerged, as after training
    model.eval()
    model.config.use_cache = True
    generate_pages(model, tokenizer, prompts[:2], max_new_tokens=8, batch_size=2)  # warm-up
    seed_style = generate_pages(model, tokenizer, prompts[:seed_style_prompts], max_new_tokens=256, batch_size=1,
                                stop_at_html_end=False)
    print(f"seed-style: {seed_style.summary()}", flush=True)
    ours, peaks = {}, {}
    for batch in batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            ours[batch] = generate_pages(model, tokenizer, prompts, max_new_tokens=256, batch_size=batch)
            peaks[batch] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError:
            peaks[batch] = "OOM under the 15 GiB cap"
        print(f"generation batch {batch}: {ours[batch].summary() if batch in ours else peaks[batch]}", flush=True)
    del model
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return {"seed_style_one_by_one_256": seed_style.summary(),
            **{f"ours_batched_{b}": {**r.summary(), "peak_gib": peaks[b]} for b, r in ours.items()},
            **{f"speedup_examples_per_s_batch{b}": round(r.examples_per_s / seed_style.examples_per_s, 2)
               for b, r in ours.items()},
            "peaks_gib": peaks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--blocks", default="2048,4096")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed-style-prompts", type=int, default=4)
    parser.add_argument("--gen-batches", default="8,16")
    args = parser.parse_args()
    import transformers, peft, bitsandbytes  # noqa: E401

    started = time.perf_counter()
    model_path = build_checkpoint(args.work / "llama2-7b-shaped")  # uncapped: the fp16 build needs 13.5 GB
    torch.cuda.set_per_process_memory_fraction(T4_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.reset_peak_memory_stats()
    report = {"gpu": torch.cuda.get_device_name(0), "memory_cap_gib": T4_GIB, "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__,
              "bitsandbytes": bitsandbytes.__version__, "date": time.strftime("%Y-%m-%d"),
              "build_checkpoint_s": round(time.perf_counter() - started, 1), "training": []}
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits

    test = load_splits(Config.from_preset("colab-t4"))[0]["test"]
    prompts = list(test["label"][:32])
    report["generation"] = measure_generation(model_path, args.work / "gen", prompts, args.seed_style_prompts,
                                              tuple(int(b) for b in args.gen_batches.split(",")))
    for block in [int(b) for b in args.blocks.split(",") if b]:
        report["training"].append(measure_training(model_path, args.work / f"run-{block}", block, args.steps))
        print(json.dumps(report["training"][-1]), flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "colab_t4_on_h200.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
