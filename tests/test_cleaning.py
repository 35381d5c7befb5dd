"""Scraped pages: triage flags each kind of row that cannot teach a page, and cleaning keeps what renders."""

import json

import pytest

from htmlgen_utils.cleaning import UNTEACHABLE, clean_markup, triage, triage_counts
from htmlgen_utils.config import REPO_DIR

ARTICLE = (
    "<!DOCTYPE html><html><head><title>Ferns</title></head><body><main><h1>Growing ferns indoors</h1>"
    "<p>Ferns like shade, humid air and soil that never dries out completely.</p></main></body></html>"
)
PLANTED = {  # kind -> (description, page)
    "not a page": ("A blog post about ferns", '{"error": "rate limited"}'),
    "challenge page": (
        "A landing page for a bakery",
        "<html><body><h1>Checking if the site connection is secure</h1><p>This may take a few seconds.</p>"
        "</body></html>",
    ),
    "consent wall": (
        "A news site's front page",
        "<html><body><div><h2>We value your privacy</h2><button>Accept all cookies</button></div></body></html>",
    ),
    "error page": (
        "A pricing page for Orbit",
        "<html><body><h1>404 Not Found</h1><p>The requested URL was not found on this server.</p></body></html>",
    ),
    "empty render": (
        "A dashboard for a shop",
        '<html><head></head><body><div id="__next" data-reactroot=""><div class="sc-AxjAm kITaNo"></div></div>'
        "<script>window.__APP__=1</script></body></html>",
    ),
    "script-dominated": (
        "A page about ferns and their care",
        ARTICLE.replace("</body>", "<script>" + "var x = 1;" * 400 + "</script></body>"),
    ),
    "short description": ("basic page", ARTICLE),
}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_triage_flags_each_planted_kind_with_its_reason(kind):
    description, page = PLANTED[kind]
    found = triage(description, page)
    assert kind in found.reasons and found.reasons[kind], found.reasons
    assert found.teachable is (kind not in UNTEACHABLE)


def test_triage_leaves_good_pages_and_asked_for_error_pages_alone():
    """No bundled row is flagged as unteachable, a 404 page asked for is no error page, and length is flagged
    only against the block."""
    rows = [json.loads(line) for line in (REPO_DIR / "data" / "html_pages.jsonl").read_text().splitlines()]
    results = [triage(row["label"], row["html"]) for row in rows]
    assert all(result.teachable for result in results), triage_counts(results)
    assert not triage("A retro 404 error page for Nova", PLANTED["error page"][1]).reasons.get("error page")
    assert "too long" in triage("A blog post about ferns", ARTICLE, tokens=5000, max_tokens=4096).reasons
    counts = triage_counts(
        [triage(*PLANTED["not a page"]), triage(*PLANTED["empty render"]), triage(*PLANTED["empty render"])]
    )
    assert counts["empty render"] == 2 and counts["not a page"] == 1


SCRAPED = (
    "<!DOCTYPE html><html><head><title>Shop</title><!-- build 4f2a --><style>.card{padding:8px}</style>"
    '<script type="application/json" id="__NEXT_DATA__">{"props":{"items":[1,2,3]}}</script>'
    "<script>window.dataLayer=[];function gtag(){dataLayer.push(arguments)}</script></head>"
    '<body>\n    <nav data-track="nav" data-v-1a2b3c=""><a href="/">Home</a> <a href="/shop">Shop</a></nav>\n\n\n'
    '    <main><h1 data-testid="title">Ferns for every room</h1>\n'
    '<img alt="a fern" width="64" height="64" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
    '<div class="card" data-id="17"><p>Boston fern, 12 euros.</p></div>'
    "<pre>  keep   this\n    spacing</pre></main>\n  </body></html>"
)


def test_safe_cleaning_removes_what_never_renders_and_keeps_the_rest():
    cleaned = clean_markup(SCRAPED, "safe")
    for gone in ("build 4f2a", "__NEXT_DATA__", "dataLayer", "data-track", "data-testid", "iVBORw0KGgo", "\n\n\n"):
        assert gone not in cleaned, gone
    for kept in ("<style>.card{padding:8px}</style>", '<a href="/">Home</a> <a href="/shop">Shop</a>',
                 '<div class="card">', "placeholder.png", "<pre>  keep   this\n    spacing</pre>"):  # fmt: skip
        assert kept in cleaned, kept
    assert clean_markup(SCRAPED, "none") == SCRAPED and clean_markup(cleaned, "safe") == cleaned
    assert clean_markup("<b>a</b>\xa0<b>b</b>", "safe") == "<b>a</b>\xa0<b>b</b>"  # a no-break space shows
    svg = '<svg><path d="M0 0L10 10L20 0Z"/></svg><div class="sc-AxjAm kITaNo card">x</div>'
    assert clean_markup(svg, "aggressive") == '<svg><path d=""/></svg><div class="card">x</div>'
    with pytest.raises(ValueError, match="page_cleaning must be one of"):
        clean_markup(SCRAPED, "harsh")


def test_cleaned_pages_render_the_same_text_where_it_was_with_fewer_tokens():
    """Chromium renders each page and its safe-cleaned form (a scraped-style page, a bundled long page, one
    minified onto one line); Design2Code's text and position scores of one against the other are >= 0.95 (the
    same text blocks where they were), and the cleaned page has fewer tokens."""
    from htmlgen_utils.config import TINY_BASE_DIR
    from htmlgen_utils.layout import find_chromium, layout_scores, render_pages
    from htmlgen_utils.model import load_tokenizer
    from tests.test_evaluation import minified_long_page

    if find_chromium() is None:
        pytest.skip("no Chromium")
    long_pages = [json.loads(line)["html"] for line in (REPO_DIR / "data" / "long_pages.jsonl").open()]
    shortest = min(long_pages, key=len)  # inline CSS, a script and an SVG chart; matching its blocks is quick
    pages = [SCRAPED, shortest, minified_long_page(1)]  # the last: one long page on one line
    cleaned = [clean_markup(page, "safe") for page in pages]
    rendered = render_pages(pages + cleaned)
    tokenizer = load_tokenizer(str(TINY_BASE_DIR))
    for index, (page, clean) in enumerate(zip(pages, cleaned)):
        scores = layout_scores(rendered[len(pages) + index], rendered[index])
        assert rendered[index].blocks and scores["text_similarity"] >= 0.95, (index, scores)
        assert scores["position_similarity"] >= 0.95, (index, scores)
        assert len(tokenizer(clean).input_ids) < len(tokenizer(page).input_ids), index


def test_a_scraped_style_dataset_loses_its_unteachable_rows_and_its_dead_weight(tmp_path):
    """`load_splits` on the scraped-style set (`tests/scraped.py`): the bot checks, consent walls and shells are
    dropped and counted by reason, nothing else is, and the kept pages lose their scripts' bodies, JSON state
    and base64 images; with `drop_unteachable` off and no cleaning every row stays as it was."""
    from htmlgen_utils.config import Config
    from htmlgen_utils.data import load_splits
    from tests.scraped import scraped_rows

    rows = scraped_rows()
    path = tmp_path / "scraped.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    splits, report = load_splits(Config.from_preset("tiny", dataset=str(path), test_fraction=0.2))
    assert report.unteachable_dropped == {"challenge page": 8, "consent wall": 4, "empty render": 4}
    assert report.rows_kept == len(rows) - 16 and report.flagged["short description"] >= 1
    pages = [page for name in splits for page in splits[name]["html"]]
    assert not any("__NEXT_DATA__" in page or ";base64," in page or "gtag(" in page for page in pages)
    kept, report = load_splits(
        Config.from_preset("tiny", dataset=str(path), test_fraction=0.2, drop_unteachable=False, page_cleaning="none")
    )
    assert report.rows_kept == len(rows) and report.unteachable_dropped == {}
    assert sorted(p for name in kept for p in kept[name]["html"]) == sorted(row["html"] for row in rows)
