"""Stage 2: the prompt template, tokenisation, the long-page policy, and packing into blocks.

Each example becomes `BOS + prompt + page + EOS`. Examples are packed *whole* into fixed-length blocks
(first-fit decreasing), so every block token sees its own instruction; position ids restart at 0 for
each example, and transformers turns restarting position ids into a block-diagonal causal mask when no
attention_mask and no KV cache is passed (`use_cache=False`; SDPA and eager, so it works on a T4), so
attention stays inside one example.

Labels are the input ids themselves: the loss shifts them by one (`labels[t+1]` is the target of the
logits at `t`; `loss.next_token_loss`). The original notebook compared each position's logits with the *same*
position's token, which teaches copying; `tests/test_packing.py` proves ours is next-token. Labels are
-100 (ignored) on each example's first token (it would be predicted from the previous example), on the
instruction when `loss_on_response_only`, and on block padding.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .config import LONG_PAGE_POLICIES, Config
from .data import arrow_dataset

IGNORE_INDEX = -100
PROMPT_HEADER = (
    "Below is an instruction that describes a task. You will be provided a prompt and based on it you "
    "have to generate HTML code. Write a response that appropriately completes the request."
)


STOP_STRING = "</html>"  # a page ends here; generation stops at it


def build_prompt(description: str) -> str:
    """The Alpaca-style prompt; the page follows it directly."""
    return f"{PROMPT_HEADER}\n\n### Instruction:\n{description}\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------- tokenisation
# Elements whose content is raw text: a cut inside one would put the closing tags into its text
_RAW_TEXT = re.compile(
    r"<(script|style|textarea|title)\b[^>]*>.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)", re.IGNORECASE | re.DOTALL
)


def _cut_at_tag_boundary(page: str, offsets: list[tuple[int, int]], budget: int, avoid_raw_text: bool = False) -> int:
    """How many page tokens to keep: the longest prefix of at most `budget` tokens whose text ends with '>'
    (a complete tag), or the plain `budget` prefix when no tag ends inside it. With `avoid_raw_text`, never a
    prefix that ends inside a script, style, textarea, title or comment."""
    inside = [(m.start(), m.end()) for m in _RAW_TEXT.finditer(page)] if avoid_raw_text else []
    for keep in range(budget, 0, -1):
        end = offsets[keep - 1][1]
        if end > 0 and page[end - 1] == ">" and not any(a < end < b for a, b in inside):
            return keep
    return budget


def closing_tags(html_prefix: str) -> str:
    """The end tags that close every element still open at the end of `html_prefix`, innermost first, as the
    HTML standard's parser (html5lib) sees them: `</li></ul></div></body></html>`."""
    import html5lib

    parser = html5lib.HTMLParser()
    parser.parse(html_prefix)
    return "".join(f"</{element.name}>" for element in reversed(parser.tree.openElements))


def tokenize_example(tokenizer, description: str, page: str, max_tokens: int, policy: str, response_only: bool) -> dict:
    """Token ids, labels and the policy's verdict for one pair.

    Long-page policy (`max_tokens` per example, prompt included):
      * `truncate_close`: keep the whole instruction and the first part of the page, cut after the last complete
        tag that fits (never inside a script, style or comment), then append the end tags of the elements still
        open (`</div>...</body></html>`) and EOS: a cut example still teaches a complete, valid document that ends.
      * `truncate`: the same cut, nothing appended, and *no* EOS (the page goes on, so the model must not learn to
        stop there).
      * `drop`: leave the example out.
    An example whose instruction alone leaves fewer than 16 tokens for the page is dropped either way.
    """
    prompt_ids = tokenizer(build_prompt(description)).input_ids  # starts with BOS
    page_enc = tokenizer(page, add_special_tokens=False, return_offsets_mapping=True)
    page_ids = page_enc.input_ids
    eos = tokenizer.eos_token_id
    status, full_length = "kept", len(prompt_ids) + len(page_ids) + 1
    if full_length > max_tokens:
        budget = max_tokens - len(prompt_ids)
        if policy == "drop" or budget < 16:
            return {
                "input_ids": [],
                "labels": [],
                "status": "dropped",
                "full_length": full_length,
                "prompt_length": len(prompt_ids),
            }
        status = "truncated"
        if policy == "truncate":
            page_ids = page_ids[: _cut_at_tag_boundary(page, page_enc.offset_mapping, budget)]
        else:
            page_ids = _truncate_and_close(tokenizer, page, page_enc, budget - 1)  # room for EOS
    input_ids = prompt_ids + page_ids + ([eos] if status == "kept" or policy == "truncate_close" else [])
    labels = list(input_ids)
    if response_only:
        labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
    labels[0] = IGNORE_INDEX  # the first token has no context inside its example
    return {
        "input_ids": input_ids,
        "labels": labels,
        "status": status,
        "full_length": full_length,
        "prompt_length": len(prompt_ids),
    }


def _truncate_and_close(tokenizer, page: str, page_enc, room: int) -> list[int]:
    """Page tokens cut at a tag boundary plus the end tags that close what is open, in at most `room` tokens."""
    offsets, budget = page_enc.offset_mapping, room
    while budget > 0:
        keep = _cut_at_tag_boundary(page, offsets, budget, avoid_raw_text=True)
        closing = tokenizer(closing_tags(page[: offsets[keep - 1][1]]), add_special_tokens=False).input_ids
        if keep + len(closing) <= room:
            return page_enc.input_ids[:keep] + closing
        budget = min(budget - 1, room - len(closing))  # make room for the end tags, then cut again
    return []


PARALLEL_ROWS = 20_000  # splits this large are tokenised by one process per CPU core (`datasets.map(num_proc=)`)


def tokenize_split(split: datasets.Dataset, tokenizer, config: Config) -> datasets.Dataset:
    """`datasets.map` over a split, written batch by batch to an Arrow file; keeps every row (dropped ones empty)
    so the policy's counts are visible. Large splits are tokenised by several processes."""

    def fn(batch):
        out = {
            "input_ids": [],
            "labels": [],
            "status": [],
            "full_length": [],
            "prompt_length": [],
            "length": [],
            "loss_tokens": [],
        }
        for description, page in zip(batch["label"], batch["html"]):
            example = tokenize_example(
                tokenizer,
                description,
                page,
                config.max_example_tokens,
                config.long_page_policy,
                config.loss_on_response_only,
            )
            example["length"] = len(example["input_ids"])
            example["loss_tokens"] = sum(label != IGNORE_INDEX for label in example["labels"])
            for key in out:
                out[key].append(example[key])
        return out

    cores = os.cpu_count() or 1
    num_proc = min(cores, 8) if len(split) >= PARALLEL_ROWS and cores > 1 else None
    return split.map(fn, batched=True, remove_columns=split.column_names, desc="tokenising", num_proc=num_proc)


LENGTH_MARKS = (2048, 4096, 8192, 16384)


def length_shares(lengths: list[int]) -> dict[str, float]:
    """The share of examples longer than 2k, 4k, 8k and 16k tokens."""
    return {
        f"over {mark:,} tokens": round(sum(n > mark for n in lengths) / max(1, len(lengths)), 3)
        for mark in LENGTH_MARKS
    }


def long_page_report(split: datasets.Dataset, tokenizer, config: Config):
    """What each long-page policy does to `split` at `config.max_example_tokens`: examples kept whole, cut,
    dropped, and the tokens they lose (a table, one row per policy)."""
    import pandas as pd

    rows = {}
    for policy in LONG_PAGE_POLICIES:
        tokenized = tokenize_split(split, tokenizer, config.replace(long_page_policy=policy))
        status, full = tokenized["status"], tokenized["full_length"]
        kept = [len(ids) for ids in tokenized["input_ids"]]
        rows[policy] = {
            "kept whole": status.count("kept"),
            "cut": status.count("truncated"),
            "dropped": status.count("dropped"),
            "tokens lost": sum(full) - sum(kept),
            "ends with EOS": sum(bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in tokenized["input_ids"]),
        }
    return pd.DataFrame(rows).T


def policy_examples(description: str, page: str, tokenizer, config: Config):
    """One example under each long-page policy: its status, its tokens, whether it ends with EOS, and how its
    page text ends."""
    import pandas as pd

    rows = {}
    for policy in LONG_PAGE_POLICIES:
        example = tokenize_example(
            tokenizer, description, page, config.max_example_tokens, policy, config.loss_on_response_only
        )
        ids = example["input_ids"]
        text = tokenizer.decode(ids[example["prompt_length"] :], skip_special_tokens=True) if ids else ""
        rows[policy] = {
            "status": example["status"],
            "tokens": len(ids),
            "ends with EOS": bool(ids) and ids[-1] == tokenizer.eos_token_id,
            "page ends with": repr(text[-70:]) if text else "(left out)",
        }
    return pd.DataFrame(rows).T


# ---------------------------------------------------------------------------------------------- packing
@dataclass
class PackingStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens_before_policy: int = 0
    tokens_cut_by_policy: int = 0
    blocks: int = 0
    block_size: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0
    loss_tokens: int = 0
    examples_per_block: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def fill_rate(self) -> float:
        return self.real_tokens / max(1, self.blocks * self.block_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "fill_rate": round(self.fill_rate, 4)}


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens, longest first, each into the first bin
    with room. Deterministic; typically fills > 95% of every block when examples are short.

    The first bin with room is found in a tree of the bins' free room (each node holds the most free room
    below it), in log(bins) steps instead of a scan over every open bin (which grows with the square of the
    examples: 100k pairs make ~25k bins)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    leaves = 1
    while leaves < max(1, len(lengths)):
        leaves *= 2
    room = [0] * (2 * leaves)  # room[1] is the root; leaf `leaves + b` is bin b (0 until the bin opens)
    bins: list[list[int]] = []
    for i in order:
        need = max(1, lengths[i])
        if room[1] >= need:  # some open bin has room: walk down to the leftmost one that does
            node = 1
            while node < leaves:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            bins[node - leaves].append(i)
        else:
            node = leaves + len(bins)
            bins.append([i])
            room[node] = capacity
        room[node] -= lengths[i]
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


BLOCK_FEATURES = datasets.Features(
    {name: datasets.List(datasets.Value("int64")) for name in ("input_ids", "labels", "position_ids")}
)


def pack_examples(
    tokenized: datasets.Dataset, block_size: int, pad_token_id: int
) -> tuple[datasets.Dataset, PackingStats]:
    """Whole examples into blocks of exactly `block_size` tokens with per-example position ids.

    Only the examples' lengths are held in memory; the token ids are read back in block order and the blocks
    written to an Arrow file as they are made."""
    stats = PackingStats(examples=len(tokenized), block_size=block_size)
    lengths = tokenized["length"]
    for status, full, length in zip(tokenized["status"], tokenized["full_length"], lengths):
        setattr(stats, status, getattr(stats, status) + 1)
        stats.tokens_before_policy += full
        stats.tokens_cut_by_policy += full - length
    too_long = [i for i, n in enumerate(lengths) if n > block_size]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples exceed block_size={block_size}: set max_example_tokens <= block_size"
        )
    keep = [i for i, n in enumerate(lengths) if n > 0]
    bins = [
        sorted(keep[m] for m in members)  # inside a block, keep the dataset's order
        for members in first_fit_decreasing([lengths[i] for i in keep], block_size)
    ]
    in_block_order = tokenized.select([i for members in bins for i in members]).select_columns(["input_ids", "labels"])

    def blocks():
        examples = (
            row for batch in in_block_order.iter(batch_size=1000) for row in zip(batch["input_ids"], batch["labels"])
        )
        for members in bins:
            input_ids, labels, positions = [], [], []
            for ids, example_labels in (next(examples) for _ in members):
                input_ids += ids
                labels += example_labels
                positions += range(len(ids))
            pad = block_size - len(input_ids)
            input_ids += [pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += range(pad)  # padding is its own segment: it attends only to itself
            yield {"input_ids": input_ids, "labels": labels, "position_ids": positions}

    packed = arrow_dataset(blocks(), BLOCK_FEATURES)
    stats.blocks = len(bins)
    stats.real_tokens = sum(lengths)
    stats.padding_tokens = stats.blocks * block_size - stats.real_tokens
    stats.loss_tokens = sum(n for n, length in zip(tokenized["loss_tokens"], lengths) if length > 0)
    stats.examples_per_block = round(len(keep) / max(1, len(bins)), 2)
    return packed, stats


def pack_splits(
    splits: datasets.DatasetDict, tokenizer, config: Config
) -> tuple[datasets.DatasetDict, dict[str, PackingStats]]:
    """Tokenise and pack every split; returns the blocks and the per-split statistics."""
    packed, stats = {}, {}
    for name, split in splits.items():
        tokenized = tokenize_split(split, tokenizer, config)
        packed[name], stats[name] = pack_examples(tokenized, config.block_size, tokenizer.pad_token_id)
        if stats[name].blocks == 0:
            raise ValueError(
                f"The {name} split has no example left after the long-page policy "
                f"({config.long_page_policy}, max_example_tokens={config.max_example_tokens}): "
                f"raise max_example_tokens or use long_page_policy='truncate'"
            )
    return datasets.DatasetDict(packed), stats


PACKING_SETTINGS = ("block_size", "max_example_tokens", "long_page_policy", "loss_on_response_only")


def packing_fingerprint(config: Config, tokenizer) -> dict:
    """What packed blocks depend on: the packing settings and the tokenizer (its vocabulary, hashed, and its
    special tokens), so blocks packed under other settings are never trained on silently."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return {
        **{name: getattr(config, name) for name in PACKING_SETTINGS},
        "tokenizer_vocab_sha256": hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest()[:16],
        "bos_eos_pad": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }


def packing_mismatch(run_dir: str | Path, fingerprint: dict) -> str | None:
    """How the blocks saved in `run_dir` differ from what `fingerprint` asks for (None: they match)."""
    import json

    saved_file = Path(run_dir) / "packed" / "packing_fingerprint.json"
    if not saved_file.exists():
        return "the packed blocks carry no record of their settings (packed by an older version)"
    saved = json.loads(saved_file.read_text())
    differences = [
        f"{key} {saved.get(key)!r} there, {value!r} here"
        for key, value in fingerprint.items()
        if saved.get(key) != value
    ]
    return "; ".join(differences).replace("tokenizer_vocab_sha256", "tokenizer") or None


def save_packed(
    packed: datasets.DatasetDict, stats: dict[str, PackingStats], run_dir: str | Path, fingerprint: dict | None = None
) -> Path:
    import json

    out = Path(run_dir) / "packed"
    packed.save_to_disk(str(out))
    (out / "packing_stats.json").write_text(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=2) + "\n")
    if fingerprint is not None:
        (out / "packing_fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    return out


def load_packed(run_dir: str | Path) -> datasets.DatasetDict:
    folder = Path(run_dir) / "packed"
    if not (folder / "dataset_dict.json").exists():
        raise FileNotFoundError(f"No packed data in {folder}: run notebook 02_prompts_and_packing first (same run_dir)")
    return datasets.load_from_disk(str(folder))


# ---------------------------------------------------------------------------------------------- batches
def make_dataloader(
    blocks: datasets.Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Batches of {input_ids, labels, position_ids}: this rank's share of the blocks (all of them in a world of
    one), shuffled by torch's `DistributedSampler`.

    The order depends only on (seed, epoch): a resumed run skips exactly the batches it already trained on.
    Over several processes each takes every `world_size`-th block of the epoch's one permutation, so no block is
    seen twice in an epoch (the last `len(blocks) % world_size` of the permutation wait for the next epoch). The
    loader gets a generator of its own: otherwise each new loader draws its base seed from the global RNG, and a
    resumed run (which makes a new loader mid-epoch) would draw different dropout masks from an uninterrupted one."""
    sampler = DistributedSampler(blocks, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[skip_batches * batch_size :]
    subset = blocks.select(order).select_columns(list(BLOCK_COLUMNS))
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_blocks,
        generator=torch.Generator().manual_seed(seed),
    )


BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of equal-length blocks -> a dict of (batch, block_size) LongTensors. (Plain lists, not datasets'
    torch formatter, which imports torchvision and breaks where that is installed without its video parts.)"""
    return {k: torch.tensor([row[k] for row in rows], dtype=torch.long) for k in BLOCK_COLUMNS}
