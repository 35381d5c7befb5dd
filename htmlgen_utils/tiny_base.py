"""Build the tiny pre-trained base model that the `tiny` preset fine-tunes on CPU.

A randomly initialised model can only write noise, so a CPU run would show nothing and a broken stage
would look like a working one. This script makes the tiny base the way real base models are made,
only smaller: a tokenizer trained on our data, then full-precision causal-LM pre-training on web pages
and, separately, on descriptions -- never on (description, page) pairs, so following an instruction
is left for the QLoRA fine-tune to teach. Only the training split's rows are used: the held-out test
pages stay unseen.

    python -m htmlgen_utils.tiny_base --out htmlgen_utils/tiny_base      # ~10 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from .config import TINY_BASE_DIR, Config
from .data import load_splits
from .packing import build_prompt
from .tiny_model import tiny_llama_config, train_tokenizer

ARCHITECTURE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, max_position_embeddings=1024)
RECIPE = dict(vocab_size=2048, seq_len=512, batch_size=8, steps=900, learning_rate=3e-3, warmup=50, seed=0,
              threads=2)


def pretraining_texts(seed: int = 42) -> tuple[list[str], list[str]]:
    """(pages, descriptions) of the bundled training split (the tiny preset's split and seed)."""
    splits, _ = load_splits(Config.from_preset("tiny", seed=seed))
    return list(splits["train"]["html"]), list(splits["train"]["label"])


def build(out: Path | None, steps: int = RECIPE["steps"], log_every: int = 50, stop_after: int | None = None) -> dict:
    """Pre-train and save to `out`. `stop_after` runs only the first steps of the same schedule and saves
    nothing: a quick check that a rebuild follows the recorded loss curve."""
    torch.manual_seed(RECIPE["seed"])
    random.seed(RECIPE["seed"])
    torch.set_num_threads(RECIPE["threads"])
    from transformers import LlamaForCausalLM

    pages, descriptions = pretraining_texts()
    # The tokenizer sees the prompt template too, so the instruction costs few tokens.
    tokenizer = train_tokenizer(pages + [build_prompt(d) for d in descriptions], RECIPE["vocab_size"])
    docs = [tokenizer(p).input_ids + [tokenizer.eos_token_id] for p in pages]
    docs += [tokenizer(d).input_ids + [tokenizer.eos_token_id] for d in descriptions]
    random.Random(RECIPE["seed"]).shuffle(docs)
    stream = [t for doc in docs for t in doc]
    seq = RECIPE["seq_len"]
    chunks = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)

    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **ARCHITECTURE))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], weight_decay=0.01)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, RECIPE["warmup"], steps)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    model.train()
    started, losses, loss_log = time.perf_counter(), [], []
    for step in range(1, (stop_after or steps) + 1):
        batch = chunks[torch.randint(len(chunks), (RECIPE["batch_size"],), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            loss_log.append(round(recent, 4))
            print(f"step {step}/{steps} loss {recent:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    seconds = time.perf_counter() - started
    if stop_after is not None:
        return {"loss_log": loss_log, "steps": stop_after, "seconds": round(seconds, 1)}
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)  # fp16 on disk: half the size; loads in any dtype
    tokenizer.save_pretrained(out)
    report = {"final_train_loss_last50": round(final_loss, 4), "steps": steps, "seconds": round(seconds, 1),
              "tokens_seen": steps * RECIPE["batch_size"] * seq, "corpus_tokens": len(stream),
              "parameters": sum(p.numel() for p in model.parameters()), "architecture": ARCHITECTURE,
              "loss_log_every": log_every, "loss_log": loss_log,
              "recipe": RECIPE, "torch": torch.__version__}
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    a = report["architecture"]
    return f"""# tiny-html-llama: the `tiny` preset's base model

A {report['parameters'] / 1e6:.1f}M-parameter `LlamaForCausalLM` (Llama-2's architecture at toy size) and a
byte-level BPE tokenizer of {report['recipe']['vocab_size']} tokens, made by `python -m htmlgen_utils.tiny_base`.

- Architecture: hidden {a['hidden_size']}, {a['num_layers']} layers, {a['num_heads']} heads, MLP {a['intermediate_size']},
  context {a['max_position_embeddings']}, untied embeddings; weights stored in fp16.
- Data: the pages and, as separate documents, the descriptions of the bundled dataset's training split
  (never paired, so following an instruction is what the QLoRA fine-tune teaches; test pages never seen):
  {report['corpus_tokens']:,} tokens, cut into {report['recipe']['seq_len']}-token sequences.
- Training: {report['steps']} steps of AdamW (lr {report['recipe']['learning_rate']}, cosine, warm-up
  {report['recipe']['warmup']}), batch {report['recipe']['batch_size']}, fp32, seed {report['recipe']['seed']},
  {report['recipe']['threads']} CPU threads: {report['tokens_seen']:,} tokens in {report['seconds']:.0f} s.
- Final training loss (mean of the last 50 steps): {report['final_train_loss_last50']}.
- Rebuild: `python -m htmlgen_utils.tiny_base --out DIR` (the same loss within a few hundredths; exact bits
  depend on the CPU's math library). `build_report.json` holds these figures.

Not a useful model of HTML beyond this dataset: it exists so CPU runs and tests show real pages.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-train the tiny base model on CPU.")
    parser.add_argument("--out", type=Path, default=TINY_BASE_DIR)
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.steps), indent=2))


if __name__ == "__main__":
    main()
