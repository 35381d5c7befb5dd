import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from htmlgen_utils.packing import (
    IGNORE_INDEX,
    build_prompt,
    first_fit_decreasing,
    make_dataloader,
    pack_examples,
    pack_splits,
    tokenize_example,
    tokenize_split,
)


@pytest.fixture(scope="module")
def tokenizer(random_tiny_model):
    return AutoTokenizer.from_pretrained(random_tiny_model)


def test_prompt_template():
    prompt = build_prompt("a blue login page")
    assert prompt.startswith("Below is an instruction that describes a task. You will be provided a prompt")
    assert prompt.endswith("### Instruction:\na blue login page\n\n### Response:\n")


def test_example_layout(tokenizer, bundled_rows):
    row = bundled_rows[0]
    ex = tokenize_example(tokenizer, row["label"], row["html"], 4096, "truncate", response_only=True)
    ids, labels, n_prompt = ex["input_ids"], ex["labels"], ex["prompt_length"]
    assert ex["status"] == "kept"
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # EOS kept, with a label
    assert labels[-1] == tokenizer.eos_token_id
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:-1]) == row["html"]
    full = tokenize_example(tokenizer, row["label"], row["html"], 4096, "truncate", response_only=False)
    assert full["labels"][0] == IGNORE_INDEX and full["labels"][1:] == full["input_ids"][1:]


def test_long_page_policy_cuts_at_a_tag_boundary(tokenizer):
    page = "<!DOCTYPE html><html><body>" + "<p>hello world</p>" * 400 + "</body></html>"
    ex = tokenize_example(tokenizer, "long", page, 300, "truncate", True)
    assert ex["status"] == "truncated" and len(ex["input_ids"]) <= 300
    kept_page = tokenizer.decode(ex["input_ids"][ex["prompt_length"] :])
    assert kept_page.endswith(">") and page.startswith(kept_page)
    assert ex["input_ids"][-1] != tokenizer.eos_token_id  # a cut page must not teach stopping
    dropped = tokenize_example(tokenizer, "long", page, 300, "drop", True)
    assert dropped["status"] == "dropped" and dropped["input_ids"] == []
    huge_prompt = tokenize_example(tokenizer, "word " * 400, "<p>x</p>", 300, "truncate", True)
    assert huge_prompt["status"] == "dropped"


def naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing as the textbook writes it: a scan over the open bins for each example."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = max(1, lengths[i])
        b = next((b for b, room in enumerate(free) if room >= need), None)
        if b is None:
            bins.append([])
            free.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def test_first_fit_decreasing_is_the_textbook_algorithm():
    """The tree search over the bins' free room gives the bins of the plain scan, example for example, over 300
    random cases (few and many items, short and long, ties); every bin within capacity and every
    example in exactly one bin. A walk that took the wrong subtree would put some example in another bin."""
    import random

    bins = first_fit_decreasing([5, 3, 8, 2, 7, 1], 10)
    assert bins == [[2, 3], [4, 1], [0, 5]]
    rng = random.Random(0)
    for case in range(300):
        capacity = rng.choice([10, 64, 1024])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 120))]
        bins = first_fit_decreasing(lengths, capacity)
        assert bins == naive_first_fit_decreasing(lengths, capacity), case
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_packing_invariants(tokenizer, bundled_rows, tiny_config):
    rows = bundled_rows[:40] + [{"label": "huge", "html": "<div>" + "<p>x y z</p>" * 2000 + "</div>"}]
    split = datasets.Dataset.from_list([{"label": r["label"], "html": r["html"]} for r in rows])
    tokenized = tokenize_split(split, tokenizer, tiny_config)
    packed, stats = pack_examples(tokenized, tiny_config.block_size, tokenizer.pad_token_id)
    assert stats.truncated == 1 and stats.kept == 40 and stats.tokens_cut_by_policy > 0
    assert stats.tokens_before_policy - stats.tokens_cut_by_policy == stats.real_tokens
    assert stats.blocks * stats.block_size == stats.real_tokens + stats.padding_tokens
    # every kept token appears exactly once, example by example, with restarting positions
    seen = []
    for block in packed:
        ids, pos, labels = block["input_ids"], block["position_ids"], block["labels"]
        assert len(ids) == len(pos) == len(labels) == tiny_config.block_size
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))
            assert labels[a] == IGNORE_INDEX  # never predict across an example boundary
            if ids[a] == tokenizer.bos_token_id:
                seen.append(tuple(ids[a:b]))
    expected = sorted(tuple(x) for x in tokenized["input_ids"] if x)
    assert sorted(seen) == expected
    eos_count = sum(block["input_ids"].count(tokenizer.eos_token_id) for block in packed)
    assert eos_count == 41  # one EOS per example: truncate_close ends the cut one too
    cut_only = tokenize_split(split, tokenizer, tiny_config.replace(long_page_policy="truncate"))
    assert sum(ids[-1] == tokenizer.eos_token_id for ids in cut_only["input_ids"] if ids) == 40  # `truncate`: none
    assert stats.fill_rate > 0.5


def test_labels_are_next_token_targets_not_copies(random_tiny_model, tokenizer):
    """The original defect: an unshifted loss teaches copying. Ours: the model's loss equals the cross-entropy of
    logits[t] against token[t+1], and differs from the same-position (copy) loss."""
    model = AutoModelForCausalLM.from_pretrained(random_tiny_model, dtype=torch.float32)
    ids = torch.tensor([tokenize_example(tokenizer, "a page", "<p>hi</p>", 512, "truncate", False)["input_ids"]])
    labels = ids.clone()
    labels[0, 0] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels)
    logits = out.logits[0].float()
    next_token = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    same_position = torch.nn.functional.cross_entropy(logits[1:], ids[0, 1:])
    assert torch.allclose(out.loss, next_token, atol=1e-5)
    assert not torch.allclose(out.loss, same_position, atol=1e-3)


def test_restarting_positions_isolate_examples(random_tiny_model):
    """With position ids restarting and no attention mask, the second example's logits do not depend on the first."""
    model = AutoModelForCausalLM.from_pretrained(random_tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    a, b, other_a = torch.randint(5, 500, (1, 12)), torch.randint(5, 500, (1, 9)), torch.randint(5, 500, (1, 12))
    pos = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0)
    # use_cache=False matters: with a KV cache transformers does not look for packed sequences
    first = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits[0, 12:]
    second = model(input_ids=torch.cat([other_a, b], 1), position_ids=pos, use_cache=False).logits[0, 12:]
    alone = model(input_ids=b, use_cache=False).logits[0]
    assert torch.allclose(first, second, atol=1e-5) and torch.allclose(first, alone, atol=1e-5)
    plain = model(input_ids=torch.cat([a, b], 1), use_cache=False).logits[
        0, 12:
    ]  # without restarts the first example leaks in
    assert not torch.allclose(plain, alone, atol=1e-3)


def test_pack_splits_and_dataloader(tokenizer, tiny_config, bundled_rows):
    splits = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [{"label": r["label"], "html": r["html"]} for r in bundled_rows[i : i + 10]]
            )
            for name, i in (("train", 0), ("validation", 10), ("test", 20))
        }
    )
    packed, stats = pack_splits(splits, tokenizer, tiny_config)
    assert set(stats) == {"train", "validation", "test"}
    batches = list(make_dataloader(packed["train"], 2, shuffle=True, seed=1, epoch=0))
    assert batches[0]["input_ids"].shape == (min(2, len(packed["train"])), tiny_config.block_size)
    again = list(make_dataloader(packed["train"], 2, shuffle=True, seed=1, epoch=0, skip_batches=1))
    assert torch.equal(again[0]["input_ids"], batches[1]["input_ids"]) if len(batches) > 1 else True
    with pytest.raises(ValueError, match="no example left"):
        pack_splits(splits, tokenizer, tiny_config.replace(max_example_tokens=40, long_page_policy="drop"))
