"""How often a prompt-lookup draft is right on pages like ours: tokens a decode step yields with a lookahead.

    PYTHONPATH=$PWD python bench/lookahead_drafts.py --out $OUT      # CPU, ~1 minute

A model that writes exactly the bundled dataset's pages, decoding greedily with `decode_one(lookahead=k)`:
at each step `lookahead.PromptLookup` drafts from the prompt and the page so far, the step keeps the draft's
tokens up to the first that differs from the page, plus one. Reports tokens per step, the share of steps with
a draft, and tokens per checked step, for a few lookaheads (and, with `--shortest`, drafting only from runs of
at least that many last tokens), on the short and the long bundled pages (with the tiny base's tokenizer; a
Llama tokenizer splits pages into more, shorter tokens), and the speed-up that gives if a check costs
`--check-cost` one-token steps. No model runs: this is the draft side of the trade; `lookahead_decode.py`
times the check side on the GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from common import REPO, versions, write_report


def replay(prompt: list[int], page: list[int], lookahead: int, shortest: int = 1) -> tuple[int, int]:
    """Steps and checks a greedy lookahead decode of `page` after `prompt` takes, drafting only from runs of
    `shortest` last tokens or more."""
    from htmlgen_utils.levers.lookahead import PromptLookup

    lookup = PromptLookup(prompt + page[:1], shortest=shortest)  # the first token: the prompt's own forward
    done, steps, checks = 1, 0, 0
    while done < len(page):
        draft = lookup.draft(lookahead)
        agreed = next((i for i, token in enumerate(draft) if done + i >= len(page) or page[done + i] != token),
                      len(draft))
        new = page[done:done + agreed + 1]
        steps, checks, done = steps + 1, checks + bool(draft), done + len(new)
        lookup.extend(new)
    return steps, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=1024, help="each page cut to this many tokens")
    parser.add_argument("--lookaheads", default="1,2,3,4,6,8")
    parser.add_argument("--shortest", default="1", help="shortest runs of last tokens a draft may come from")
    parser.add_argument("--check-cost", type=float, default=2.0,
                        help="a check's time in one-token steps, end to end (lookahead_decode.py measured ~2.0 on "
                             "an H200), for the predicted speed-up")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from htmlgen_utils.config import TINY_BASE_DIR
    from htmlgen_utils.packing import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    report = {**versions(), "pages": args.pages, "tokens": args.tokens, "check_cost": args.check_cost, "rows": {}}
    for name in ("html_pages.jsonl", "long_pages.jsonl"):
        rows = [json.loads(line) for line in (REPO / "data" / name).open()][:args.pages]
        pairs = [(tokenizer(build_prompt(row["label"])).input_ids,
                  tokenizer(row["html"], add_special_tokens=False).input_ids[:args.tokens]) for row in rows]
        for lookahead, shortest in itertools.product(map(int, args.lookaheads.split(",")),
                                                     map(int, args.shortest.split(","))):
            steps = checks = tokens = 0
            for prompt, page in pairs:
                s, c = replay(prompt, page, lookahead, shortest)
                steps, checks, tokens = steps + s, checks + c, tokens + len(page) - 1
            time_in_steps = steps - checks + checks * args.check_cost  # a one-token loop takes `tokens` steps
            key = f"{name} lookahead {lookahead}" + (f" shortest {shortest}" if shortest > 1 else "")
            report["rows"][key] = {
                "tokens_per_step": round(tokens / steps, 3), "share_of_steps_checked": round(checks / steps, 3),
                "tokens_per_checked_step": round((tokens - (steps - checks)) / max(checks, 1), 3),
                "predicted_vs_one_token": round(tokens / time_in_steps, 3)}
            print(key, report["rows"][key], flush=True)
    write_report(report, args.out, "lookahead_drafts.json")


if __name__ == "__main__":
    main()
