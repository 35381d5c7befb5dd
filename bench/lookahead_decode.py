"""Batch-1 decoding with the lookahead check against the one-token loop, on a page like the bundled ones.

    PYTHONPATH=$PWD python bench/lookahead_decode.py --out $OUT             # one CUDA GPU, ~3 minutes
    PYTHONPATH=$PWD python bench/lookahead_decode.py --smoke --out /tmp/b   # CPU, tiny model: checks the script

How much a lookahead check saves depends on how often its draft is right, which depends on what the model
writes; random weights write noise (or loop on one token, which drafts perfectly). So the model's choices are
replaced by a page's: `decode_one` runs for real (every step and check on the GPU, every read-back), then each
step's greedy picks are swapped for the page's next tokens before the loop sees them. The time is the real
loop's; the drafts and what they keep are those of a model that writes that page (the held-out test pages,
the first `--pages`, each cut to `--tokens`). Ways, interleaved `--repeats` times: `decode_one` with
`lookahead=0` (the one-token loop; its speed does not depend on the tokens, so it runs as it is, reading back
every STOP_CHECK_TOKENS) and with the default lookahead, following the page; tokens/s as median (min-max) over
the pages, the lookahead's steps, checks and tokens a step, and the GPU time of a step and of a check alone
(their CUDA graphs replayed back to back), which splits a check's cost between the GPU and the loop around it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from common import REPO, peak_gib, reset_peak, sync, versions, write_report


@contextmanager
def following(page: list[int], prompt_tokens: int):
    """While active, every `DecodeStep` returns the page's tokens as its greedy picks (after running, and after
    its own result is read back): the new token at position p is `page[p - prompt_tokens]`."""
    from htmlgen_utils.levers import decoding

    real = decoding.DecodeStep.__call__

    def call(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = real(self, token, position)
        out.tolist()  # the real loop reads its result back here
        after = [int(p) - prompt_tokens + 1 for p in position.tolist()]
        picks = torch.tensor([page[i] if 0 <= i < len(page) else 0 for i in after])
        if self.token.shape[1] > 1:
            return picks
        return torch.nn.functional.one_hot(picks[-1:], out.shape[-1]).float()  # logits whose argmax is the pick

    decoding.DecodeStep.__call__ = call
    try:
        yield
    finally:
        decoding.DecodeStep.__call__ = real


def replayed_ms(step, replays: int = 50) -> float | None:
    """Milliseconds of one replay of a `DecodeStep`'s CUDA graph, replayed `replays` times with no host work
    between them (None on CPU, where there is no graph)."""
    if step.graph is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    step.graph.replay()
    start.record()
    for _ in range(replays):
        step.graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / replays, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/htmlgen-bench"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the 7B's 32: compiles in a fraction "
                        "of the time, for the replayed step and check (their cost a layer)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from generation_compare import one_prompt_model
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from htmlgen_utils.levers.decoding import decode_one
    from htmlgen_utils.levers.lookahead import LOOKAHEAD_TOKENS
    from htmlgen_utils.packing import build_prompt

    began = time.perf_counter()
    model, tokenizer, _ = one_prompt_model(args.work, args.smoke, args.layers)
    print(f"model ready in {time.perf_counter() - began:.0f} s", flush=True)  # where a cut-off run spent its time
    device = next(model.parameters()).device
    test = load_splits(Config.from_preset("colab-t4"))[0]["test"]
    pages = []
    for label, html in zip(test["label"], test["html"]):
        ids = tokenizer([build_prompt(label)], return_tensors="pt").input_ids.to(device)
        page = tokenizer(html, add_special_tokens=False).input_ids[:args.tokens]
        if len(page) == args.tokens:
            pages.append((ids, page))
        if len(pages) == args.pages:
            break
    ways = {"one-token loop": 0, f"lookahead {LOOKAHEAD_TOKENS}": LOOKAHEAD_TOKENS}
    report = {**versions(), "smoke": args.smoke, "layers": None if args.smoke else args.layers or 32,
              "tokens": args.tokens, "pages": len(pages), "repeats": args.repeats, "rows": {}}

    def run(lookahead: int, ids: torch.Tensor, page: list[int], counts: dict) -> int:
        with following(page, ids.shape[1]) if lookahead else nullcontext():
            return sum(len(piece) for piece in decode_one(model, tokenizer, ids, args.tokens, stop_at_html_end=False,
                                                          lookahead=lookahead, counts=counts))

    with torch.no_grad():
        for name, lookahead in ways.items():  # warm-up: compiles and captures
            started = time.perf_counter()
            run(lookahead, *pages[0], {})
            report["rows"][name] = {"warmup_s": round(time.perf_counter() - started, 1)}
            print(f"{name}: compiled and captured in {report['rows'][name]['warmup_s']} s", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        totals = {"steps": 0, "checks": 0, "tokens": 0}
        for _ in range(args.repeats):  # interleaved
            for name, lookahead in ways.items():
                reset_peak()
                tokens, seconds = 0, 0.0
                for ids, page in pages:
                    counts: dict = {}
                    sync()
                    started = time.perf_counter()
                    tokens += run(lookahead, ids, page, counts)
                    sync()
                    seconds += time.perf_counter() - started
                    if lookahead:
                        for key in totals:
                            totals[key] += counts[key]
                rates[name].append(tokens / seconds)
                report["rows"][name]["peak_gib"] = peak_gib()
        for name in ways:
            report["rows"][name].update(tokens_per_s=round(statistics.median(rates[name]), 1),
                                        tokens_per_s_min=round(min(rates[name]), 1),
                                        tokens_per_s_max=round(max(rates[name]), 1))
        runs = len(pages) * args.repeats  # each run's first token comes from the prompt's forward, not a step
        report["lookahead"] = {**totals, "tokens_per_step": round((totals["tokens"] - runs) / totals["steps"], 3),
                               "share_of_steps_checked": round(totals["checks"] / totals["steps"], 3)}
        first, second = (report["rows"][name]["tokens_per_s"] for name in ways)
        report["lookahead_vs_one_token"] = round(second / first, 3)
        # the GPU's own time for a step and for a check, their graphs replayed back to back: what the loops add
        # to these (host work, read-backs) is the rest of their time a step
        steps = {step.token.shape[1]: step for step in model.__dict__["_htmlgen_decode_steps"].values()}
        report["replayed_ms"] = {"step" if n == 1 else f"check of {n} tokens": replayed_ms(step)
                                 for n, step in sorted(steps.items())}
        print("replayed back to back, ms:", report["replayed_ms"], flush=True)
    print(report, flush=True)
    write_report(report, args.out, "lookahead_decode.json")


if __name__ == "__main__":
    main()
