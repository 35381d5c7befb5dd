"""What cleaning a page saves in tokens, and whether the page still renders the same, per cleaning policy.

    PYTHONPATH=$PWD python bench/page_cleaning.py --tokenizer DIR --real PAGES --out bench/results   # CPU

Three sets: the bundled pages, the bundled long pages, and real saved web pages (`--real`: a folder searched
for `*.html`, e.g. the `test/test-pages/*/source.html` of mozilla/readability, Apache-2.0; the pages are read,
never copied here). For each page and policy (`none`, `safe`, `aggressive`, `htmlgen_utils.cleaning`): tokens
with the tokenizer in DIR (Llama-2's `tokenizer.model`, as `token_counts.py` loads it; else the tiny base's),
and the triage flags. With `--render N`, the first N pages of each set are rendered in Chromium (scripts off,
as the layout scores render) and the cleaned page is scored against the original with Design2Code's text and
position similarity. Prints and writes the medians per set and policy.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="", help="a folder with Llama-2's tokenizer.model (default: tiny)")
    parser.add_argument("--real", type=Path, help="a folder of saved web pages (*.html, searched recursively)")
    parser.add_argument("--render", type=int, default=0, help="render this many pages of each set in Chromium")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="page_cleaning.json")
    args = parser.parse_args()
    from htmlgen_utils.cleaning import CLEANING, clean_markup, triage, triage_counts
    from htmlgen_utils.config import TINY_BASE_DIR
    from htmlgen_utils.layout import layout_scores, render_pages
    from htmlgen_utils.model import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or str(TINY_BASE_DIR))
    bundled = [json.loads(line) for line in (REPO / "data" / "html_pages.jsonl").open()]
    long_rows = [json.loads(line) for line in (REPO / "data" / "long_pages.jsonl").open()]
    sets = {
        "bundled": [(r["label"], r["html"]) for r in bundled],
        "bundled-long": [(r["label"], r["html"]) for r in long_rows],
    }
    if args.real:
        pages = sorted(args.real.rglob("*.html"))
        sets["real"] = [("a web page", path.read_text(encoding="utf-8", errors="replace")) for path in pages]
    report = {"tokenizer": args.tokenizer or "tiny base", "sets": {}}
    for name, rows in sets.items():
        tokens = {
            policy: [len(tokenizer(clean_markup(page, policy)).input_ids) for _, page in rows] for policy in CLEANING
        }
        row = {"pages": len(rows), "characters_median": statistics.median(len(page) for _, page in rows)}
        row["tokens_median"] = {policy: statistics.median(counts) for policy, counts in tokens.items()}
        for policy in ("safe", "aggressive"):
            cuts = [1 - after / before for before, after in zip(tokens["none"], tokens[policy]) if before]
            row[f"token_cut_median_{policy}"] = round(statistics.median(cuts), 3)
        row["triage"] = triage_counts([triage(label, page) for label, page in rows])
        if args.render:
            sample = [page for _, page in rows[: args.render]]
            for policy in ("safe", "aggressive"):
                rendered = render_pages(sample + [clean_markup(page, policy) for page in sample])
                scores = [layout_scores(rendered[len(sample) + i], rendered[i]) for i in range(len(sample))]
                row[f"render_{policy}"] = {
                    key: round(min(s[key] for s in scores), 3) for key in ("text_similarity", "position_similarity")
                }
        report["sets"][name] = row
        print(name, json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.name).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
