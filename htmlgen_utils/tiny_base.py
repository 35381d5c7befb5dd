"""Build the tiny pre-trained base model that the `tiny` preset fine-tunes on CPU.

A randomly initialised model can only write noise, so a CPU run would show nothing and a broken stage
would look like a working one. This script makes the tiny base the way real base models are made,
only smaller: a tokenizer trained on our data, then full-precision causal-LM pre-training on web pages
and, separately, on descriptions -- never on (description, page) pairs, so following an instruction
is left for the QLoRA fine-tune to teach. Only the training split's rows are used: the held-out test
pages stay unseen.

`--long` makes the `tiny-long` preset's base from it: 300 more steps that add the long-page set's training
pages (`bundled-long`, 5k-33k characters), as real bases have seen long pages too.

    python -m htmlgen_utils.tiny_base --out htmlgen_utils/tiny_base      # ~20 min on 2 CPU cores
    python -m htmlgen_utils.tiny_base --long                             # ~4 min: htmlgen_utils/tiny_base_long
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from .config import TINY_BASE_DIR, TINY_LONG_BASE_DIR, Config
from .data import load_splits
from .packing import build_prompt
from .tiny_model import tiny_llama_config, train_tokenizer

ARCHITECTURE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, max_position_embeddings=1024)
RECIPE = dict(
    vocab_size=2048,
    seq_len=512,
    batch_size=8,
    steps=900,
    learning_rate=3e-3,
    warmup=50,
    seed=0,
    threads=2,
    # the long-page base: short and long pages together, from the tiny base's weights
    long_steps=300,
    long_learning_rate=1e-3,
    long_warmup=20,
    long_test_fraction=0.2,
)


EARLY_STEPS = 10  # the report keeps these first steps' mean loss: a quick rebuild check compares it


def pretraining_texts(seed: int = 42) -> tuple[list[str], list[str]]:
    """(pages, descriptions) of the bundled training split (the tiny preset's split and seed)."""
    splits, _ = load_splits(Config.from_preset("tiny", seed=seed))
    return list(splits["train"]["html"]), list(splits["train"]["label"])


def long_pretraining_pages(seed: int = 42) -> list[str]:
    """The long-page set's training pages at `long_test_fraction` 0.2: its test (and validation) rows are the
    first of one seeded order, so any test fraction up to 0.2 keeps its test pages unseen."""
    splits, _ = load_splits(
        Config.from_preset("tiny", dataset="bundled-long", seed=seed, test_fraction=RECIPE["long_test_fraction"])
    )
    return list(splits["train"]["html"])


def token_chunks(tokenizer, texts: list[str]) -> tuple[torch.Tensor, int]:
    """Each text tokenized and ended with EOS, shuffled (seeded), concatenated and cut into `seq_len` rows;
    and how many tokens the texts make."""
    docs = [tokenizer(text).input_ids + [tokenizer.eos_token_id] for text in texts]
    random.Random(RECIPE["seed"]).shuffle(docs)
    stream = [t for doc in docs for t in doc]
    seq = RECIPE["seq_len"]
    return torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq), len(stream)


def pretrain(
    model,
    chunks: torch.Tensor,
    steps: int,
    learning_rate: float,
    warmup: int,
    log_every: int,
    stop_after: int | None = None,
) -> tuple[list[float], float, float]:
    """Causal-LM training on random rows of `chunks` (AdamW, cosine schedule): the loss every `log_every`
    steps, the seconds it took, and the mean loss of the first `EARLY_STEPS`."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
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
    return loss_log, time.perf_counter() - started, round(sum(losses[:EARLY_STEPS]) / EARLY_STEPS, 4)


def build(out: Path | None, steps: int = RECIPE["steps"], log_every: int = 50, stop_after: int | None = None) -> dict:
    """Pre-train the tiny base and save it to `out`. `stop_after` runs only the first steps of the same schedule
    and saves nothing: a quick check that a rebuild follows the recorded loss curve."""
    _seed_and_threads()
    from transformers import LlamaForCausalLM

    pages, descriptions = pretraining_texts()
    # The tokenizer sees the prompt template too, so the instruction costs few tokens.
    tokenizer = train_tokenizer(pages + [build_prompt(d) for d in descriptions], RECIPE["vocab_size"])
    chunks, corpus_tokens = token_chunks(tokenizer, pages + descriptions)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **ARCHITECTURE))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    loss_log, seconds, early = pretrain(
        model, chunks, steps, RECIPE["learning_rate"], RECIPE["warmup"], log_every, stop_after
    )
    if stop_after is not None:
        return {"loss_log": loss_log, "early_loss": early, "steps": stop_after, "seconds": round(seconds, 1)}
    report = _report(model, steps, loss_log, log_every, seconds, corpus_tokens, early_loss=early)
    _save(model, tokenizer, out, report, model_card(report))
    return report


def build_long(out: Path, tiny_base: Path = TINY_BASE_DIR, log_every: int = 50) -> dict:
    """The long-page base: the tiny base (from `tiny_base`) pre-trained further on its own data plus the long-page
    set's training pages, saved to `out`."""
    _seed_and_threads()
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    model = LlamaForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    pages, descriptions = pretraining_texts()
    long_pages = long_pretraining_pages()
    chunks, corpus_tokens = token_chunks(tokenizer, pages + long_pages + descriptions)
    loss_log, seconds, _ = pretrain(
        model, chunks, RECIPE["long_steps"], RECIPE["long_learning_rate"], RECIPE["long_warmup"], log_every
    )
    report = _report(
        model, RECIPE["long_steps"], loss_log, log_every, seconds, corpus_tokens, long_pages=len(long_pages)
    )
    _save(model, tokenizer, out, report, long_model_card(report))
    return report


def _seed_and_threads() -> None:
    torch.manual_seed(RECIPE["seed"])
    random.seed(RECIPE["seed"])
    torch.set_num_threads(RECIPE["threads"])


def _report(
    model, steps: int, loss_log: list[float], log_every: int, seconds: float, corpus_tokens: int, **extra
) -> dict:
    """What `build_report.json` and the model card record of a pre-training run."""
    return {
        "final_train_loss_last50": loss_log[-1],
        "steps": steps,
        "seconds": round(seconds, 1),
        "tokens_seen": steps * RECIPE["batch_size"] * RECIPE["seq_len"],
        "corpus_tokens": corpus_tokens,
        **extra,
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": ARCHITECTURE,
        "loss_log_every": log_every,
        "loss_log": loss_log,
        "recipe": RECIPE,
        "torch": torch.__version__,
    }


def _save(model, tokenizer, out: Path, report: dict, card: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)  # fp16 on disk: half the size; loads in any dtype
    tokenizer.save_pretrained(out)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(card)


def model_card(report: dict) -> str:
    a = report["architecture"]
    return f"""# tiny-html-llama: the `tiny` preset's base model

A {report["parameters"] / 1e6:.1f}M-parameter `LlamaForCausalLM` (Llama-2's architecture at toy size) and a
byte-level BPE tokenizer of {report["recipe"]["vocab_size"]} tokens, made by `python -m htmlgen_utils.tiny_base`.

- Architecture: hidden {a["hidden_size"]}, {a["num_layers"]} layers, {a["num_heads"]} heads,
  MLP {a["intermediate_size"]},
  context {a["max_position_embeddings"]}, untied embeddings; weights stored in fp16.
- Data: the pages and, as separate documents, the descriptions of the bundled dataset's training split
  (never paired, so following an instruction is what the QLoRA fine-tune teaches; test pages never seen):
  {report["corpus_tokens"]:,} tokens, cut into {report["recipe"]["seq_len"]}-token sequences.
- Training: {report["steps"]} steps of AdamW (lr {report["recipe"]["learning_rate"]}, cosine, warm-up
  {report["recipe"]["warmup"]}), batch {report["recipe"]["batch_size"]}, fp32, seed {report["recipe"]["seed"]},
  {report["recipe"]["threads"]} CPU threads: {report["tokens_seen"]:,} tokens in {report["seconds"]:.0f} s.
- Final training loss (mean of the last 50 steps): {report["final_train_loss_last50"]}.
- Rebuild: `python -m htmlgen_utils.tiny_base --out DIR` (the same loss within a few hundredths; exact bits
  depend on the CPU's math library). `build_report.json` holds these figures.

Not a useful model of HTML beyond this dataset: it exists so CPU runs and tests show real pages.
"""


def long_model_card(report: dict) -> str:
    r = report["recipe"]
    return f"""# tiny-html-llama-long: the `tiny-long` preset's base model

The tiny base (`../tiny_base`, same architecture and tokenizer) pre-trained further with long pages, made by
`python -m htmlgen_utils.tiny_base --long`. Pre-trained on short pages only, the tiny base had never seen a long
page's body (its loss there was 9-11, worse than a uniform guess), so fine-tuning it on long pages measured
little but that gap; real bases have seen long pages.

- Data: the tiny base's own (the bundled training split's pages and descriptions) plus the
  {report["long_pages"]} training pages of the long-page set (`--dataset bundled-long`, split at test_fraction
  {r["long_test_fraction"]}: test and validation rows come first in one seeded order, so any test fraction up to
  {r["long_test_fraction"]} keeps its test pages unseen); never (description, page) pairs:
  {report["corpus_tokens"]:,} tokens, cut into {r["seq_len"]}-token sequences.
- Training: {report["steps"]} steps of AdamW from the tiny base's weights (lr {r["long_learning_rate"]}, cosine,
  warm-up {r["long_warmup"]}), batch {r["batch_size"]}, fp32, seed {r["seed"]}, {r["threads"]} CPU threads:
  {report["tokens_seen"]:,} tokens in {report["seconds"]:.0f} s.
- Final training loss (mean of the last 50 steps): {report["final_train_loss_last50"]}.
- Rebuild: `python -m htmlgen_utils.tiny_base --long --out DIR`. `build_report.json` holds these figures.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-train the tiny base model on CPU.")
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped model's folder")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument(
        "--long", action="store_true", help="build the long-page base (tiny_base_long) from the tiny base instead"
    )
    args = parser.parse_args(argv)
    report = build_long(args.out or TINY_LONG_BASE_DIR) if args.long else build(args.out or TINY_BASE_DIR, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
