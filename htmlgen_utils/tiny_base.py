"""Build the tiny pre-trained base model that the `tiny` preset fine-tunes on CPU.

A randomly initialised model can only write noise, so a CPU run would show nothing and a broken stage
would look like a working one. This script makes the tiny base the way real base models are made,
only smaller: a tokenizer trained on our data, then full-precision causal-LM pre-training on web pages
(carrying their `<meta name="description">`, as many web pages do) and, separately, on descriptions. It never
sees the prompt's (instruction, response) form: following an instruction is left for the QLoRA fine-tune to
teach. Only the training split's rows are used: the held-out test pages stay unseen.

What real bases learnt from the web and a base of 30 brands would not: to copy a name from its context. So in
most documents the brand is an invented name (`RECIPE`), and the tokenizer keeps spaces apart, so a name is one
token wherever it stands. `copy_probe` checks the result; the first tiny base, without these, scored 0.

Then whole pages, as real bases extend their context at the end of pre-training: rows of 512 tokens cut most pages
(400-720 tokens) before the sections after `</main>`, which then never saw the description in the page's head, and
the fine-tuned model added them whatever its prompt asked. A few hundred steps on 1,024-token rows that each hold a
whole page taught the base, and through it the fine-tuned model, to choose them by the description.

`--long` makes the `tiny-long` preset's base from it: 300 more steps that add the long-page set's training
pages (`bundled-long`, 5k-33k characters), as real bases have seen long pages too.

    python -m htmlgen_utils.tiny_base --device cuda   # ~8 min on one GPU (hours on 2 CPU cores): tiny_base
    python -m htmlgen_utils.tiny_base --long          # ~5 min on 2 CPU cores: htmlgen_utils/tiny_base_long
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from html import escape
from pathlib import Path

import torch

from .config import TINY_BASE_DIR, TINY_LONG_BASE_DIR, Config
from .data import load_splits
from .packing import build_prompt
from .prompt_following import bundled_attributes
from .tiny_model import tiny_llama_config, train_tokenizer

ARCHITECTURE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, max_position_embeddings=1024)
RECIPE = dict(
    vocab_size=2048,
    seq_len=512,
    batch_size=32,
    steps=6000,
    learning_rate=3e-3,
    warmup=100,
    seed=0,
    threads=2,
    # Web pages often carry a <meta name="description">: this share of the pages gets one (their own description).
    # It is what teaches the base that a page follows what is said of it: without it no copying formed at all.
    meta_description_share=1.0,
    # The bundled pages name only 30 brands, few enough to memorise, and a model that can memorise never learns
    # to copy. In this share of the documents the brand is swapped for an invented name (syllables drawn afresh
    # each time), which the model can only get right by copying it from earlier in the page.
    invented_name_share=0.75,
    # whole pages: rows of this many tokens, each starting at a document, after the steps above; in rounds (cosine
    # each, warm restarts: the weights between rounds pass through fp16, as saved), the document stream restarted
    whole_page_seq_len=1024,
    whole_page_batch_size=16,
    whole_page_rounds=[300, 600],
    whole_page_learning_rate=1e-3,
    whole_page_warmup=20,
    # the long-page base: short and long pages together, from the tiny base's weights
    long_steps=300,
    long_batch_size=8,
    long_learning_rate=1e-3,
    long_warmup=20,
    long_test_fraction=0.2,
)
SYLLABLES = "ba be bo da del fa fen ga gil ka kel ko la lin lu ma mer mo na nor pa pel ra ren ro sa sel ta tor".split()

EARLY_STEPS = 3  # the report keeps these first steps' mean loss: a quick rebuild check compares it
WHOLE_PAGE_LOG_EVERY = 25


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


def with_meta_description(page: str, description: str) -> str:
    """The page with `<meta name="description">` after its charset, as many web pages have."""
    meta = f'<meta name="description" content="{escape(description)}">\n'
    head = '<meta charset="utf-8">\n'
    return page.replace(head, head + meta, 1) if head in page else page


def invented_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def renamed(text: str, brand: str, name: str) -> str:
    """`text` with the brand, as a whole word, swapped for `name`."""
    return re.sub(rf"\b{re.escape(brand)}\b", name, text)


class PretrainingStream:
    """Rows of `seq_len` tokens cut from an endless, seeded stream of documents: each a training page (a share with
    its meta description) or a description, its brand swapped for an invented name in a share of them; each
    document starts with BOS and ends with EOS. With `whole_pages`, every row starts at a document's start, so it
    holds a whole page (and the start of the next documents)."""

    def __init__(self, tokenizer, pages: list[str], descriptions: list[str], seed: int = RECIPE["seed"]):
        brands = bundled_attributes()
        self.documents = [(page, label, brands[label]["brand"]) for page, label in zip(pages, descriptions)]
        self.tokenizer, self.rng, self.buffer, self.waiting = tokenizer, random.Random(seed), [], []

    def _document(self) -> str:
        page, label, brand = self.rng.choice(self.documents)
        if self.rng.random() < 0.5:  # half the documents are a description alone, as the first base had them
            text = label
        else:
            text = with_meta_description(page, label) if self.rng.random() < RECIPE["meta_description_share"] else page
        if self.rng.random() < RECIPE["invented_name_share"]:
            text = renamed(text, brand, invented_name(self.rng))
        return text

    def _next_document_ids(self) -> list[int]:
        if not self.waiting:
            texts = [self._document() for _ in range(16)]
            self.waiting = [ids + [self.tokenizer.eos_token_id] for ids in self.tokenizer(texts).input_ids]
        return self.waiting.pop(0)

    def rows(self, count: int, whole_pages: bool = False) -> torch.Tensor:
        if whole_pages:
            seq, rows = RECIPE["whole_page_seq_len"], []
            for _ in range(count):
                row = []
                while len(row) < seq:
                    row += self._next_document_ids()
                rows.append(row[:seq])  # the last document is cut: its start is seen here
            return torch.tensor(rows)
        seq = RECIPE["seq_len"]
        while len(self.buffer) < count * seq:
            self.buffer += self._next_document_ids()
        rows, self.buffer = self.buffer[: count * seq], self.buffer[count * seq :]
        return torch.tensor(rows).view(count, seq)


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
    next_batch,
    steps: int,
    learning_rate: float,
    warmup: int,
    log_every: int,
    stop_after: int | None = None,
) -> tuple[list[float], float, float]:
    """Causal-LM training on `next_batch()` rows (AdamW, cosine schedule) on the model's device: the loss every
    `log_every` steps, the seconds it took, and the mean loss of the first `EARLY_STEPS`."""
    from transformers import get_cosine_schedule_with_warmup

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    started, losses, loss_log = time.perf_counter(), [], []
    for step in range(1, (stop_after or steps) + 1):
        batch = next_batch().to(device)
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


def whole_page_rounds(model, tokenizer, log_every: int = WHOLE_PAGE_LOG_EVERY) -> tuple[list[list[float]], float]:
    """Pre-train further on whole-page rows (`RECIPE["whole_page_rounds"]`): the loss logs and the seconds."""
    pages, descriptions = pretraining_texts()
    logs, seconds = [], 0.0
    for steps in RECIPE["whole_page_rounds"]:
        _seed_and_threads()
        model.to(torch.float16).to(torch.float32)  # each round starts from the weights as saved
        stream = PretrainingStream(tokenizer, pages, descriptions)
        log, took, _ = pretrain(
            model,
            lambda: stream.rows(RECIPE["whole_page_batch_size"], whole_pages=True),
            steps,
            RECIPE["whole_page_learning_rate"],
            RECIPE["whole_page_warmup"],
            log_every,
        )
        logs.append(log)
        seconds += took
    return logs, seconds


def build(
    out: Path | None,
    steps: int = RECIPE["steps"],
    log_every: int = 250,
    stop_after: int | None = None,
    device: str = "cpu",
) -> dict:
    """Pre-train the tiny base and save it to `out`. `stop_after` runs only the first steps of the same schedule
    and saves nothing: a quick check that a rebuild follows the recorded loss curve."""
    _seed_and_threads()
    from transformers import LlamaForCausalLM

    pages, descriptions = pretraining_texts()
    # The tokenizer sees the prompt template too, so the instruction costs few tokens.
    tokenizer = train_tokenizer(
        pages + [build_prompt(d) for d in descriptions], RECIPE["vocab_size"], spaces_apart=True
    )
    stream, first_rows = PretrainingStream(tokenizer, pages, descriptions), []

    def next_batch() -> torch.Tensor:
        rows = stream.rows(RECIPE["batch_size"])
        if not first_rows:  # a fingerprint of the data: a rebuild must draw the very same first batch
            first_rows.append(hashlib.sha256(rows.numpy().astype("<i8").tobytes()).hexdigest()[:16])
        return rows

    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **ARCHITECTURE)).to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    loss_log, seconds, early = pretrain(
        model, next_batch, steps, RECIPE["learning_rate"], RECIPE["warmup"], log_every, stop_after
    )
    if stop_after is not None:
        return {"loss_log": loss_log, "early_loss": early, "first_batch": first_rows[0], "steps": stop_after}
    whole_logs, whole_seconds = whole_page_rounds(model, tokenizer)
    model.cpu()
    report = _report(
        model,
        steps,
        loss_log,
        log_every,
        seconds,
        RECIPE["batch_size"],
        device=_device_name(device),
        copying=copy_probe(model, tokenizer),
        vocabulary=len(tokenizer),
        early_loss=early,
        first_batch=first_rows[0],
        whole_pages={
            "loss_logs": whole_logs,
            "log_every": WHOLE_PAGE_LOG_EVERY,
            "seconds": round(whole_seconds, 1),
            "device": _device_name(device),
        },
    )
    _save(model, tokenizer, out, report, model_card(report))
    return report


def build_long(out: Path, tiny_base: Path = TINY_BASE_DIR, log_every: int = 50, device: str = "cpu") -> dict:
    """The long-page base: the tiny base (from `tiny_base`) pre-trained further on its own data plus the long-page
    set's training pages, saved to `out`."""
    _seed_and_threads()
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    model = LlamaForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).to(device)
    pages, descriptions = pretraining_texts()
    long_pages = long_pretraining_pages()
    chunks, corpus_tokens = token_chunks(tokenizer, pages + long_pages + descriptions)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    loss_log, seconds, _ = pretrain(
        model,
        lambda: chunks[torch.randint(len(chunks), (RECIPE["long_batch_size"],), generator=generator)],
        RECIPE["long_steps"],
        RECIPE["long_learning_rate"],
        RECIPE["long_warmup"],
        log_every,
    )
    model.cpu()
    report = _report(
        model,
        RECIPE["long_steps"],
        loss_log,
        log_every,
        seconds,
        RECIPE["long_batch_size"],
        device=_device_name(device),
        corpus_tokens=corpus_tokens,
        long_pages=len(long_pages),
    )
    _save(model, tokenizer, out, report, long_model_card(report))
    return report


@torch.no_grad()
def copy_probe(model, tokenizer, pages: int = 40) -> dict[str, float]:
    """Can the model copy? On validation pages it never saw (teacher-forced): the share of a brand's later mentions
    whose first token it predicts, for the page's own brand and for an invented name put in its place. A model
    that memorised the pages' templates scores near 0 on both."""
    splits, _ = load_splits(Config.from_preset("tiny"))
    brands, rng, scores = bundled_attributes(), random.Random(RECIPE["seed"]), {}
    rows = list(zip(splits["validation"]["html"], splits["validation"]["label"]))[:pages]
    model.eval()
    for name, rename in (("own_brand", False), ("invented_name", True)):
        hits = total = 0
        for page, label in rows:
            brand = brands[label]["brand"]
            name_text = invented_name(rng) if rename else brand
            ids = tokenizer(renamed(page, brand, name_text)).input_ids
            first = tokenizer(name_text, add_special_tokens=False).input_ids[0]
            mentions = [i for i, t in enumerate(ids) if t == first][1:]  # the first mention cannot be copied
            if mentions:
                predicted = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
                hits += sum(int(predicted[i - 1] == first) for i in mentions)
                total += len(mentions)
        scores[name] = round(hits / max(total, 1), 3)
    return scores


def _seed_and_threads() -> None:
    torch.manual_seed(RECIPE["seed"])
    random.seed(RECIPE["seed"])
    torch.set_num_threads(RECIPE["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on a GPU too: a CPU rebuild follows the same curve
    torch.backends.cudnn.allow_tf32 = False


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{RECIPE['threads']} CPU threads"


def _report(model, steps: int, loss_log: list[float], log_every: int, seconds: float, batch_size: int, **extra) -> dict:
    """What `build_report.json` and the model card record of a pre-training run."""
    return {
        "final_train_loss_last50": loss_log[-1],
        "steps": steps,
        "seconds": round(seconds, 1),
        "tokens_seen": steps * batch_size * RECIPE["seq_len"],
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
    a, r, w = report["architecture"], report["recipe"], report["whole_pages"]
    return f"""# tiny-html-llama: the `tiny` preset's base model

A {report["parameters"] / 1e6:.1f}M-parameter `LlamaForCausalLM` (Llama-2's architecture at toy size) and a
byte-level BPE tokenizer of {report["vocabulary"]} tokens that keeps spaces apart (a name is the same token after a
space as after a tag), made by `python -m htmlgen_utils.tiny_base`.

- Architecture: hidden {a["hidden_size"]}, {a["num_layers"]} layers, {a["num_heads"]} heads,
  MLP {a["intermediate_size"]}, context {a["max_position_embeddings"]}, untied embeddings; weights stored in fp16.
- Data: the pages and, as separate documents, the descriptions of the bundled dataset's training split (never
  paired with their page in the prompt's form, so following an instruction is what the QLoRA fine-tune teaches;
  test pages never seen). {r["meta_description_share"]:.0%} of the pages carry their description as a
  `<meta name="description">`, as web pages do. In {r["invented_name_share"]:.0%} of the documents the brand is
  an invented name, drawn afresh each time: 30 brands can be memorised, invented names can only be copied.
- Training: {report["steps"]} steps of AdamW (lr {r["learning_rate"]}, cosine, warm-up {r["warmup"]}), batch
  {r["batch_size"]} x {r["seq_len"]} tokens, fp32, seed {r["seed"]}, on {report["device"]}:
  {report["tokens_seen"]:,} tokens in {report["seconds"]:.0f} s.
- Final training loss (mean of the last {report["loss_log_every"]} steps): {report["final_train_loss_last50"]}.
- Then whole pages: {" and ".join(map(str, r["whole_page_rounds"]))} steps ({len(r["whole_page_rounds"])} cosine
  rounds, lr {r["whole_page_learning_rate"]}, warm-up {r["whole_page_warmup"]}) on rows of
  {r["whole_page_batch_size"]} x {r["whole_page_seq_len"]} tokens that each start at a document and hold a whole
  page, on {w["device"]}: {w["seconds"]:.0f} s, final loss {w["loss_logs"][-1][-1]}.
- Copying, on validation pages it never saw: it predicts {report["copying"]["own_brand"]:.0%} of a brand's later
  mentions, and {report["copying"]["invented_name"]:.0%} of an invented name's (`copy_probe`).
- Rebuild: `python -m htmlgen_utils.tiny_base --out DIR [--device cuda]` (the same loss within a few hundredths;
  exact bits depend on the device and its math library). `build_report.json` holds these figures.

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
  warm-up {r["long_warmup"]}), batch {r["long_batch_size"]}, fp32, seed {r["seed"]}, on {report["device"]}:
  {report["tokens_seen"]:,} tokens in {report["seconds"]:.0f} s.
- Final training loss (mean of the last {report["loss_log_every"]} steps): {report["final_train_loss_last50"]}.
- Rebuild: `python -m htmlgen_utils.tiny_base --long --out DIR`. `build_report.json` holds these figures.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-train the tiny base model (on CPU, or a GPU with --device).")
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped model's folder")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument(
        "--long", action="store_true", help="build the long-page base (tiny_base_long) from the tiny base instead"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same recipe, minutes not hours")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="try another recipe: e.g. --set steps=4000"
    )
    args = parser.parse_args(argv)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in RECIPE:
            parser.error(f"--set {item}: no recipe entry {key!r}; the recipe has {', '.join(RECIPE)}")
        RECIPE[key] = type(RECIPE[key])(value)
    if args.long:
        report = build_long(args.out or TINY_LONG_BASE_DIR, device=args.device)
    else:
        report = build(args.out or TINY_BASE_DIR, args.steps, device=args.device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
