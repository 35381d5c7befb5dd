"""The deterministic generator of the bundled description -> page dataset.

Public HTML datasets are tiny (43 scraped rows) and their pages run to tens of thousands of tokens,
so we ship our own: varied page kinds, components, colour schemes and styles, each described in
plain English several different ways. Every page is a complete, well-formed HTML5 document.

    python -m htmlgen_utils.dataset_generator            # rewrites data/html_pages.jsonl + DATASHEET.md

The same seed always gives the same file, byte for byte (a test checks it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from html import escape
from pathlib import Path

from .config import BUNDLED_DATA_FILE

DEFAULT_SEED = 1234
DEFAULT_SIZE = 1200

BRANDS = [
    "Acme",
    "Nimbus",
    "Bluebird",
    "Orbit",
    "Pinecone",
    "Lumen",
    "Quill",
    "Harbor",
    "Zephyr",
    "Maple",
    "Cobalt",
    "Juniper",
    "Atlas",
    "Ember",
    "Nova",
    "Sparrow",
    "Tidal",
    "Vertex",
    "Willow",
    "Kite",
    "Copper",
    "Fable",
    "Granite",
    "Helix",
    "Ivory",
    "Lotus",
    "Meadow",
    "Onyx",
    "Prism",
    "Summit",
]
PRODUCTS = [
    ("a note-taking app", "Notes"),
    ("a photo editor", "Photo"),
    ("a budgeting tool", "Budget"),
    ("a fitness tracker", "Fit"),
    ("a recipe planner", "Recipes"),
    ("a music player", "Music"),
    ("a task manager", "Tasks"),
    ("a weather app", "Weather"),
    ("a code editor", "Code"),
    ("a travel planner", "Trips"),
    ("a language course", "Lingo"),
    ("a podcast host", "Cast"),
]
SCHEMES = {  # name: (background, text, accent, muted surface)
    "blue": ("#f5f8ff", "#1a2238", "#2f6fed", "#e3ebfd"),
    "green": ("#f4fbf6", "#14301f", "#1f9d55", "#dcf2e3"),
    "dark": ("#111418", "#e8eaed", "#8ab4f8", "#1e232a"),
    "orange": ("#fffaf3", "#3a2410", "#e8710a", "#fde7cf"),
    "purple": ("#faf7ff", "#2a1840", "#7c3aed", "#ece3fc"),
    "red": ("#fff7f7", "#3b1111", "#d93025", "#fde2e0"),
    "teal": ("#f3fbfb", "#0f2e2e", "#0d9488", "#d5f0ee"),
    "gray": ("#ffffff", "#222222", "#555555", "#eeeeee"),
}
STYLES = {  # name: (font stack, corner radius, extra CSS, adjective used in descriptions)
    "minimalist": ("Helvetica, Arial, sans-serif", "0", "body{letter-spacing:0.01em}", "minimalist"),
    "modern": ("system-ui, sans-serif", "8px", "header{box-shadow:0 1px 4px rgba(0,0,0,0.1)}", "modern"),
    "playful": ("'Comic Sans MS', cursive", "16px", "h1{transform:rotate(-1deg)}", "playful"),
    "corporate": ("Georgia, serif", "2px", "header{border-bottom:3px solid var(--accent)}", "corporate"),
    "retro": ("'Courier New', monospace", "0", "body{border:4px double var(--text)}", "retro"),
}
KINDS = ["landing", "login", "signup", "pricing", "about", "dashboard", "blog", "contact", "product", "404"]
KIND_NAMES = {
    "landing": "landing page",
    "login": "login page",
    "signup": "sign-up page",
    "pricing": "pricing page",
    "about": "about page",
    "dashboard": "dashboard",
    "blog": "blog post page",
    "contact": "contact page",
    "product": "product page",
    "404": "404 error page",
}
EXTRAS = {  # optional component: phrase used in descriptions
    "navbar": "a navigation bar",
    "footer": "a footer",
    "newsletter": "a newsletter signup form",
    "testimonials": "customer testimonials",
    "download": "a download button",
    "faq": "a short FAQ",
}
OPENERS = [
    "",
    "Create ",
    "Build ",
    "Make ",
    "Generate ",
    "Write the HTML for ",
    "I need ",
    "Design ",
    "Please create ",
    "Code ",
]
FIRST_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kai", "Lena"]


def _css(scheme: str, style: str) -> str:
    bg, text, accent, surface = SCHEMES[scheme]
    font, radius, extra, _ = STYLES[style]
    return (
        f":root{{--bg:{bg};--text:{text};--accent:{accent};--surface:{surface}}}\n"
        f"body{{margin:0;font-family:{font};background:var(--bg);color:var(--text)}}\n"
        f"header,main,footer{{padding:16px 32px}}\n"
        f"nav a{{margin-right:16px;color:var(--text);text-decoration:none}}\n"
        f".button{{display:inline-block;padding:10px 20px;background:var(--accent);color:#fff;"
        f"border:none;border-radius:{radius};text-decoration:none}}\n"
        f".card{{background:var(--surface);padding:16px;margin:8px;border-radius:{radius}}}\n"
        f"table{{border-collapse:collapse;width:100%}}\n"
        f"td,th{{border:1px solid var(--surface);padding:8px;text-align:left}}\n"
        f"input,textarea{{display:block;margin:8px 0;padding:8px;width:280px}}\n"
        f"{extra}"
    )


def _navbar(brand: str) -> str:
    links = "".join(f'<a href="#{x.lower()}">{x}</a>' for x in ("Home", "Features", "Pricing", "Contact"))
    return f"<header>\n<nav><strong>{brand}</strong> {links}</nav>\n</header>"


def _footer(brand: str, year: int) -> str:
    return f"<footer>\n<p>&copy; {year} {brand}. All rights reserved.</p>\n</footer>"


def _form(fields: list[tuple[str, str]], button: str) -> str:
    rows = []
    for label, kind in fields:
        name = label.lower().replace(" ", "_")
        if kind == "textarea":
            rows.append(f'<label for="{name}">{label}</label>\n<textarea id="{name}" name="{name}"></textarea>')
        else:
            rows.append(f'<label for="{name}">{label}</label>\n<input id="{name}" name="{name}" type="{kind}">')
    return "<form>\n" + "\n".join(rows) + f'\n<button class="button" type="submit">{button}</button>\n</form>'


def _cards(items: list[tuple[str, str]]) -> str:
    return (
        "<section>\n"
        + "\n".join(f'<div class="card">\n<h3>{t}</h3>\n<p>{d}</p>\n</div>' for t, d in items)
        + "\n</section>"
    )


def _main_content(kind: str, rng: random.Random, brand: str, product: tuple[str, str]) -> str:
    product_phrase, product_word = product
    if kind == "landing":
        feats = rng.sample(
            [
                ("Fast", "Loads in under a second."),
                ("Private", "Your data stays yours."),
                ("Simple", "No manual needed."),
                ("Synced", "Works on every device."),
                ("Free", "Start without a card."),
                ("Open", "Export any time."),
            ],
            3,
        )
        return (
            f"<section>\n<h1>{brand} {product_word}</h1>\n<p>The easiest way to use {product_phrase}.</p>\n"
            f'<a class="button" href="#start">Get started</a>\n</section>\n' + _cards(feats)
        )
    if kind == "login":
        return (
            f"<h1>Sign in to {brand}</h1>\n"
            + _form([("Email", "email"), ("Password", "password")], "Log in")
            + '\n<p><a href="#reset">Forgot your password?</a></p>'
        )
    if kind == "signup":
        return f"<h1>Create your {brand} account</h1>\n" + _form(
            [("Name", "text"), ("Email", "email"), ("Password", "password")], "Sign up"
        )
    if kind == "pricing":
        base = rng.choice([5, 8, 10, 12])
        plans = [("Free", 0), ("Pro", base), ("Team", base * 3)]
        rows = "\n".join(
            f"<tr><td>{n}</td><td>${p}/month</td><td>{u}</td></tr>"
            for (n, p), u in zip(plans, ["1 user", "5 users", "Unlimited"])
        )
        return (
            f"<h1>{brand} pricing</h1>\n<table>\n<tr><th>Plan</th><th>Price</th><th>Users</th></tr>\n{rows}\n</table>"
        )
    if kind == "about":
        year = rng.randint(1990, 2022)
        team = rng.sample(FIRST_NAMES, 3)
        return (
            f"<h1>About {brand}</h1>\n<p>We started in {year} to make {product_phrase} everyone enjoys.</p>\n"
            + _cards([(n, rng.choice(["Founder", "Designer", "Engineer", "Writer"])) for n in team])
        )
    if kind == "dashboard":
        stats = [
            ("Users", rng.randint(100, 9999)),
            ("Revenue", f"${rng.randint(1, 99)}k"),
            ("Uptime", f"{rng.randint(95, 99)}%"),
        ]
        rows = "\n".join(f"<tr><td>{n}</td><td>{v}</td></tr>" for n, v in stats)
        return f"<h1>{brand} dashboard</h1>\n<table>\n<tr><th>Metric</th><th>Value</th></tr>\n{rows}\n</table>"
    if kind == "blog":
        author = rng.choice(FIRST_NAMES)
        topic = rng.choice(["getting started", "our new design", "tips for beginners", "what we learned"])
        return (
            f"<article>\n<h1>{topic.capitalize()}</h1>\n<p>By {author}</p>\n"
            f"<p>This post is about {topic} with {brand}.</p>\n<p>Thanks for reading.</p>\n</article>"
        )
    if kind == "contact":
        return f"<h1>Contact {brand}</h1>\n" + _form(
            [("Name", "text"), ("Email", "email"), ("Message", "textarea")], "Send"
        )
    if kind == "product":
        price = rng.randint(9, 199)
        return (
            f"<h1>{brand} {product_word}</h1>\n<p>{product_phrase.capitalize()} for everyone.</p>\n"
            f'<p class="price">${price}</p>\n<a class="button" href="#buy">Buy now</a>'
        )
    if kind == "404":
        return (
            f"<h1>404</h1>\n<p>Sorry, this {brand} page does not exist.</p>\n"
            f'<a class="button" href="/">Back to home</a>'
        )
    raise ValueError(f"unknown page kind {kind!r}")


def _extra_block(extra: str, brand: str, rng: random.Random) -> str:
    if extra == "newsletter":
        return "<section>\n<h2>Newsletter</h2>\n" + _form([("Email", "email")], "Subscribe") + "\n</section>"
    if extra == "testimonials":
        quotes = [
            (rng.choice(FIRST_NAMES), q)
            for q in rng.sample(
                ["I use it every day.", "It saved me hours.", "Simply the best.", "My whole team loves it."], 2
            )
        ]
        return (
            "<section>\n<h2>What people say</h2>\n"
            + "\n".join(f"<blockquote>{q} &mdash; {n}</blockquote>" for n, q in quotes)
            + "\n</section>"
        )
    if extra == "download":
        return f'<section>\n<a class="button" href="#download">Download {brand}</a>\n</section>'
    if extra == "faq":
        return (
            "<section>\n<h2>FAQ</h2>\n<dl>\n<dt>Is it free?</dt>\n<dd>Yes, to start.</dd>\n"
            "<dt>Can I cancel?</dt>\n<dd>Any time.</dd>\n</dl>\n</section>"
        )
    raise ValueError(f"unknown extra {extra!r}")


def _describe(
    rng: random.Random, kind: str, scheme: str, style: str, brand: str, product: tuple[str, str], extras: list[str]
) -> str:
    opener = rng.choice(OPENERS)
    article = "an" if STYLES[style][3][0] in "aeiou" else "a"
    colour = "dark" if scheme == "dark" else scheme
    subject = rng.choice(
        [
            f"{article} {STYLES[style][3]} {KIND_NAMES[kind]} for {brand}, {product[0]}",
            f"{article} {STYLES[style][3]} {KIND_NAMES[kind]} for {brand} in {colour}",
            f"{'an' if kind in ('about', '404') else 'a'} {KIND_NAMES[kind]} for {brand} with "
            f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} colour scheme "
            f"and {article} {STYLES[style][3]} look",
            f"{brand}'s {KIND_NAMES[kind]}, {STYLES[style][3]} style, {colour} colours",
        ]
    )
    text = subject
    if extras:
        parts = [EXTRAS[e] for e in extras]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text += rng.choice([" with ", ", including ", ". Add ", " that has "]) + joined
    text = (opener + text) if opener else text
    return text[0].upper() + text[1:] + rng.choice(["", ".", "."])


def generate_example(rng: random.Random) -> dict[str, str]:
    """One description -> page pair drawn from `rng`."""
    kind = rng.choice(KINDS)
    scheme = rng.choice(sorted(SCHEMES))
    style = rng.choice(sorted(STYLES))
    brand = rng.choice(BRANDS)
    product = rng.choice(PRODUCTS)
    extras = sorted(rng.sample(sorted(EXTRAS), rng.randint(0, 2)))
    year = rng.randint(2019, 2026)
    title = f"{brand} - {KIND_NAMES[kind].capitalize()}"
    body = []
    if "navbar" in extras:
        body.append(_navbar(brand))
    body.append("<main>\n" + _main_content(kind, rng, brand, product) + "\n</main>")
    for extra in extras:
        if extra not in ("navbar", "footer"):
            body.append(_extra_block(extra, brand, rng))
    if "footer" in extras:
        body.append(_footer(brand, year))
    html = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>\n{_css(scheme, style)}\n</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>"
    )
    label = _describe(rng, kind, scheme, style, brand, product, extras)
    # what the description asks for, recorded so evaluation can check a generated page against it
    return {
        "label": label,
        "html": html,
        "kind": kind,
        "scheme": scheme,
        "style": style,
        "brand": brand,
        "components": extras,
    }


# ---------------------------------------------------------------------------------------------- long pages
LONG_KINDS = {
    "docs": "documentation site",
    "news": "news front page",
    "shop": "online shop catalogue",
    "report": "annual report page",
    "portal": "community portal",
}
LONG_SIZE = 36
LORE = [
    "Our team ships small improvements every week.",
    "Every feature starts with a conversation.",
    "We measure what matters and publish it.",
    "Accessibility is part of every review.",
    "Data stays in the region you choose.",
    "The roadmap is public and open for votes.",
    "Support answers within one business day.",
    "Releases are signed and reproducible.",
]


def _logo_svg(accent: str, seed: int) -> str:
    bars = "".join(
        f'<rect x="{4 + 10 * i}" y="{40 - h}" width="8" height="{h}" fill="{accent}"/>'
        for i, h in enumerate([(seed * 7 + 13 * i) % 30 + 6 for i in range(6)])
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 44" width="64" height="44" role="img" '
        f'aria-label="chart"><path d="M2 42H62" stroke="{accent}" stroke-width="2"/>{bars}</svg>'
    )


def generate_long_example(rng: random.Random) -> dict[str, str]:
    """A long, realistic page (5k-40k characters): nested layout, inline CSS and a script, inline SVG, tables,
    many sections -- the kind of page users bring, for the long-page path."""
    kind = rng.choice(sorted(LONG_KINDS))
    scheme, style, brand = rng.choice(sorted(SCHEMES)), rng.choice(sorted(STYLES)), rng.choice(BRANDS)
    accent = SCHEMES[scheme][2]
    sections = []
    for s_index in range(rng.randint(3, 22)):
        heading = (
            rng.choice(
                [
                    "Overview",
                    "Getting started",
                    "Highlights",
                    "Latest",
                    "In depth",
                    "Reference",
                    "Stories",
                    "Numbers",
                    "Guides",
                    "Updates",
                ]
            )
            + f" {s_index + 1}"
        )
        cards = "\n".join(
            f'<article class="card">\n<h3>{heading} item {c + 1}</h3>\n<div class="body">\n'
            + "\n".join(
                f"<p>{rng.choice(LORE)} {brand} {rng.choice(['keeps', 'makes', 'helps'])} it "
                f"{rng.choice(['simple', 'fast', 'clear', 'safe'])}.</p>"
                for _ in range(rng.randint(1, 4))
            )
            + "\n</div>\n</article>"
            for c in range(rng.randint(2, 6))
        )
        table = ""
        if rng.random() < 0.4:
            rows = "\n".join(
                f"<tr><td>{rng.choice(FIRST_NAMES)}</td><td>{rng.randint(1, 999)}</td>"
                f"<td>{rng.randint(1, 99)}%</td></tr>"
                for _ in range(rng.randint(3, 10))
            )
            table = (
                f"<table>\n<thead><tr><th>Name</th><th>Count</th><th>Share</th></tr></thead>\n<tbody>\n{rows}\n"
                f"</tbody>\n</table>"
            )
        sections.append(
            f'<section id="s{s_index + 1}">\n<h2>{heading}</h2>\n<div class="grid">\n{cards}\n</div>\n'
            f"{table}\n</section>"
        )
    nav = "".join(f'<li><a href="#s{i + 1}">Part {i + 1}</a></li>' for i in range(len(sections)))
    script = (
        "<script>\ndocument.querySelectorAll('nav a').forEach(function (a) {\n"
        "  a.addEventListener('click', function () { if (window.scrollY > 0 && 1 < 2) { a.blur(); } });\n"
        "});\n</script>"
    )
    css = _css(scheme, style) + (
        "\n.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:8px}"
        "\nnav ul{list-style:none;display:flex;flex-wrap:wrap;gap:8px;padding:0}"
    )
    title = f"{brand} - {LONG_KINDS[kind].capitalize()}"
    html = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>\n{css}\n</style>\n</head>\n<body>\n"
        f'<header>\n<div class="brand">{_logo_svg(accent, len(sections))}<strong>{brand}</strong></div>\n'
        f"<nav>\n<ul>{nav}</ul>\n</nav>\n</header>\n<main>\n<h1>{brand} {LONG_KINDS[kind]}</h1>\n"
        + "\n".join(sections)
        + f"\n</main>\n{_footer(brand, rng.randint(2019, 2026))}\n{script}\n</body>\n</html>"
    )
    label = (
        rng.choice(["", "Create ", "Build ", "Write the HTML for "]) + f"a long {STYLES[style][3]} "
        f"{LONG_KINDS[kind]} for {brand} in {'dark' if scheme == 'dark' else scheme} with {len(sections)} sections, "
        "a chart logo and a navigation menu"
    )
    return {
        "label": label[0].upper() + label[1:],
        "html": html,
        "kind": f"long-{kind}",
        "scheme": scheme,
        "style": style,
    }


def generate_long_dataset(size: int = LONG_SIZE, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """`size` long pages (5k-40k characters), the same for the same seed."""
    rng = random.Random(seed + 1)
    return [generate_long_example(rng) for _ in range(size)]


def generate_dataset(size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """`size` distinct pairs, always the same ones for the same seed."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < size:
        row = generate_example(rng)
        key = (row["label"], row["html"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def to_jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def datasheet(rows: list[dict[str, str]], seed: int) -> str:
    html_len = [len(r["html"]) for r in rows]
    label_len = [len(r["label"]) for r in rows]
    kinds = {k: sum(r["kind"] == k for r in rows) for k in KINDS}

    def line(name, xs):
        return f"| {name} | {min(xs)} | {statistics.median(xs):.0f} | {statistics.mean(xs):.0f} | {max(xs)} |"

    return "\n".join(
        [
            "# Datasheet: the bundled htmlgen dataset",
            "",
            "`html_pages.jsonl`: one JSON object a line with `label` (a plain-English description), `html` (the page),",
            "and the generator's choices `kind`, `scheme`, `style`, `brand` and `components` (training uses label and",
            "html; evaluation checks a generated page against the choices: `prompt_following.py`).",
            "",
            "## How it was made",
            f"By `python -m htmlgen_utils.dataset_generator` (seed {seed}): a page kind, a colour "
            "scheme, a style, a brand,",
            "a product and up to two optional components (navbar, footer, newsletter form, "
            "testimonials, download button,",
            "FAQ) are drawn at random; the page is assembled from templates and the description is phrased from one of",
            "several sentence shapes with an optional imperative opener. Exact duplicates are skipped. Every page is a",
            "complete HTML5 document (doctype, html/head/body, every non-void element closed and "
            "properly nested), checked",
            "by the test suite with the same validator the evaluation uses. Running the command "
            "again reproduces the file",
            "byte for byte.",
            "",
            "## Counts",
            f"- rows: {len(rows)}",
            "- page kinds: " + ", ".join(f"{k} {v}" for k, v in kinds.items()),
            f"- colour schemes: {len(SCHEMES)}; styles: {len(STYLES)}; brands: {len(BRANDS)}",
            "",
            "## Lengths (characters)",
            "",
            "| field | min | median | mean | max |",
            "|---|---|---|---|---|",
            line("label", label_len),
            line("html", html_len),
            "",
            "## Long pages",
            f"`long_pages.jsonl` ({LONG_SIZE} rows, `--dataset bundled-long`): long, realistic pages "
            "of 5k-40k characters from",
            "the same generator (nested sections and grids, inline CSS and a script, an inline SVG chart, tables), for",
            "the long-page path: the long-page policies, RoPE scaling and generation that can finish a page.",
            "",
            "## Limits",
            "Synthetic, English, template-based pages: good for teaching a small model the mapping from a description",
            "to structure and style, not a sample of the real web. Real-world pages (for example "
            "`jawerty/html_dataset`)",
            "load through `--dataset`.",
            "",
        ]
    )


def write_bundled(path: Path = BUNDLED_DATA_FILE, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> Path:
    rows = generate_dataset(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_jsonl(rows), encoding="utf-8")
    (path.parent / "long_pages.jsonl").write_text(to_jsonl(generate_long_dataset(seed=seed)), encoding="utf-8")
    (path.parent / "DATASHEET.md").write_text(datasheet(rows, seed), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_DATA_FILE)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    print(f"wrote {write_bundled(args.out, args.size, args.seed)}")


if __name__ == "__main__":
    main()
