"""A small dataset shaped like scraped web pages, made from the bundled long pages: what a user who scraped a few
dozen sites brings. Pages are minified onto one line and weighed down as real ones are (inline JSON state, an
analytics script, comments, `data-*` attributes, a base64 image, hashed class names); beside them bot checks,
consent walls and framework shells that render nothing; some descriptions of two or three words.

    python -m tests.scraped --out scraped.jsonl     # then: python -m htmlgen_utils.pipeline --dataset scraped.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re

from htmlgen_utils.config import REPO_DIR

CHALLENGE = (
    "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body><h1>{host}</h1>"
    "<h2>Checking if the site connection is secure</h2><p>{host} needs to review the security of your connection "
    "before proceeding.</p><noscript>Enable JavaScript and cookies to continue</noscript></body></html>"
)
CONSENT = (
    '<!DOCTYPE html><html><head><title>{host}</title></head><body><div class="cmp"><h2>We value your privacy</h2>'
    "<p>We and our partners store and access information on a device.</p><button>Accept all cookies</button>"
    "<button>Manage cookie preferences</button></div></body></html>"
)
SHELL = (
    '<!DOCTYPE html><html><head><title>{host}</title><script src="/_next/static/chunks/main-{n}.js"></script>'
    '</head><body><div id="__next" data-reactroot=""><div class="sc-AxjAm kITaNo"></div></div>'
    '<script id="__NEXT_DATA__" type="application/json">{state}</script></body></html>'
)


def weigh_down(page: str, rng: random.Random) -> str:
    """The page minified onto one line, with what scraped pages carry and the browser never shows."""
    page = re.sub(r">\s+<", "><", page).replace("\n", " ")
    state = json.dumps({"props": {"items": [{"id": i, "slug": f"item-{i}"} for i in range(rng.randint(40, 400))]}})
    image = base64.b64encode(rng.randbytes(rng.randint(2_000, 12_000))).decode()
    extra = (
        f'<script id="__NEXT_DATA__" type="application/json">{state}</script>'
        "<script>window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push(arguments)}"
        "gtag('js',new Date());gtag('config','G-XXXX');</script><!-- cache: hit, build " + str(rng.random()) + " -->"
    )
    page = page.replace("</head>", extra + "</head>", 1)
    page = re.sub(r"<(div|section|a|li)\b", lambda m: f'<{m.group(1)} data-v-{rng.randrange(16**6):06x}=""', page)
    page = page.replace("<body>", f'<body><img alt="" width="1" height="1" src="data:image/png;base64,{image}">', 1)
    return page


def scraped_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    long_rows = [json.loads(line) for line in (REPO_DIR / "data" / "long_pages.jsonl").open()]
    rows = []
    for row in long_rows:
        label = row["label"]
        if rng.random() < 0.2:  # a description of two or three words
            label = " ".join(label.split()[-3:]) if len(label.split()) > 3 else label
        rows.append({"label": label, "html": weigh_down(row["html"], rng)})
    hosts = [f"{word}.example" for word in ("bakery", "atlas", "quill", "orbit", "fern", "nova", "zephyr", "onyx")]
    for index, host in enumerate(hosts):
        rows.append({"label": f"The landing page of {host}", "html": CHALLENGE.format(host=host)})
        if index % 2:
            rows.append({"label": f"A news front page for {host}", "html": CONSENT.format(host=host)})
        else:
            state = json.dumps({"page": "/", "query": {}, "buildId": f"{rng.randrange(16**8):08x}"})
            rows.append({"label": f"A shop page for {host}", "html": SHELL.format(host=host, n=index, state=state)})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = scraped_rows(args.seed)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    sizes = sorted(len(row["html"]) for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}; page characters: median {sizes[len(sizes) // 2]}, max {sizes[-1]}")


if __name__ == "__main__":
    main()
