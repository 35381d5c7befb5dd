"""Does the page follow its description? Aggregate scores cannot see a model that writes one page for every prompt
(the bundled pages share their template); these checks can.

* `follows_description`, for data whose rows carry attributes (the bundled generator records each page's kind,
  brand, colour scheme, style and components): the share of requested attributes the generated page has. The
  brand is named in its visible text; its kind is recognised from structure (a login page has a password field
  and no name field, pricing a table of prices, 404 says the page does not exist...); each requested component
  is there (nav, footer, FAQ, testimonials, a download button, a newsletter form); where the description names a
  colour (some bundled ones name none, and then no colour is asked for), its family is that of the page's computed
  background and accent colours in Chromium (`layout.render_pages`).
* `distinct_pages`: the share of prompts whose page differs from every other prompt's page (whitespace aside),
  and `mean_pairwise_similarity` of the pages beside the references': a model that ignores its prompt is flagged.

For data without attributes, `evaluation.description_coverage` (the description's words on the page) is the proxy.
"""

from __future__ import annotations

import colorsys
import difflib
import itertools
import json
import re
from functools import lru_cache

from .config import BUNDLED_DATA_FILE

ATTRIBUTES = ("kind", "brand", "scheme", "components")
# hues of the bundled schemes' accents (degrees); "dark" and "gray" are told apart by lightness and saturation
SCHEME_HUES = {"red": 4, "orange": 28, "green": 145, "teal": 175, "blue": 220, "purple": 262}
GRAY_SATURATION = 0.02  # at or below this (HSV saturation) a colour has no hue to speak of
DARK_VALUE = 0.3  # a background at or below this brightness (HSV value) is a dark scheme
ONE_PAGE_FOR_ALL = 0.5  # distinct_pages below this: the model writes much the same page whatever it is asked


@lru_cache(maxsize=1)
def bundled_attributes() -> dict[str, dict]:
    """{description: its requested attributes} for the bundled data."""
    with open(BUNDLED_DATA_FILE, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return {row["label"]: {key: row[key] for key in ATTRIBUTES if key in row} for row in rows}


def requested_attributes(descriptions: list[str]) -> list[dict] | None:
    """What each description asks for, when every one is a bundled row's; None otherwise (no attributes known).
    The generator records every page's colour scheme, but not every description names it: `scheme` is None where
    the description does not."""
    known = bundled_attributes()
    found = [known.get(d) for d in descriptions]
    if not (found and all(found) and all(len(a) == len(ATTRIBUTES) for a in found)):
        return None
    return [
        {**a, "scheme": a["scheme"] if re.search(rf"\b{a['scheme']}\b", d.lower()) else None}
        for a, d in zip(found, descriptions)
    ]


def _document(page: str):
    import html5lib

    return html5lib.parse(page, namespaceHTMLElements=False)


def _text(element) -> str:
    return " ".join(" ".join(element.itertext()).split())


def _visible_text(tree) -> str:
    body = tree.find("body")
    if body is None:
        return ""
    for hidden in body.iter():
        if hidden.tag in ("script", "style", "template"):
            hidden.text = ""
    return _text(body)


def page_kind(page: str) -> str | None:
    """The bundled kind the page's structure says it is (the first rule that holds), or None."""
    tree = _document(page)
    text = _visible_text(tree).lower()
    inputs = {(i.get("type") or "text").lower() for i in tree.iter("input")}
    names = {(i.get("name") or i.get("id") or "").lower() for i in tree.iter("input")}
    heading = next((_text(h).lower() for h in tree.iter("h1")), "")
    tables = [_text(t).lower() for t in tree.iter("table")]
    if re.search(r"\b404\b|does not exist|not found", text):
        return "404"
    if "password" in inputs:
        return "signup" if "name" in names or "create" in heading or "sign up" in text else "login"
    if any(True for _ in tree.iter("textarea")):
        return "contact"
    if any("$" in t and ("month" in t or "price" in t) for t in tables):
        return "pricing"
    if tables:
        return "dashboard"
    if any(True for _ in tree.iter("article")):
        return "blog"
    if any("price" in (e.get("class") or "") for e in tree.iter()) or "buy now" in text:
        return "product"
    if heading.startswith("about"):
        return "about"
    if "get started" in text or heading:
        return "landing"
    return None


def _has_component(tree, text: str, component: str) -> bool:
    links = " ".join(_text(e).lower() for e in itertools.chain(tree.iter("a"), tree.iter("button")))
    return {
        "navbar": any(True for _ in tree.iter("nav")),
        "footer": any(True for _ in tree.iter("footer")),
        "newsletter": "newsletter" in text or "subscribe" in links,
        "testimonials": any(True for _ in tree.iter("blockquote")) or "what people say" in text,
        "download": "download" in links,
        "faq": "faq" in text or any(True for _ in tree.iter("dl")),
    }.get(component, False)


def colour_family(background: tuple[int, int, int] | None, accent: tuple[int, int, int] | None) -> str | None:
    """The bundled colour scheme a page's computed colours belong to: dark by its background's brightness, gray
    when neither the accent nor the background has a hue, else the scheme whose accent hue is nearest."""
    if background is None:
        return None
    _, _, value = colorsys.rgb_to_hsv(*(c / 255 for c in background))
    if value <= DARK_VALUE:
        return "dark"
    for colour in (accent, background):
        if colour is None:
            continue
        hue, saturation, _ = colorsys.rgb_to_hsv(*(c / 255 for c in colour))
        if saturation > GRAY_SATURATION:
            degrees = hue * 360
            return min(
                SCHEME_HUES, key=lambda n: min(abs(SCHEME_HUES[n] - degrees), 360 - abs(SCHEME_HUES[n] - degrees))
            )
    return "gray"


def follows_description(attributes: dict, page: str, rendered=None) -> dict[str, float | bool | None]:
    """Per requested attribute, whether the page has it (`scheme` is None without a rendered page or where no colour
    was asked for), and `overall`, the share of the checked ones it has (each component counts as one)."""
    tree = _document(page)
    text = _visible_text(tree).lower()
    checks: dict[str, bool | None] = {
        "brand": attributes["brand"].lower() in text,
        "kind": page_kind(page) == attributes["kind"],
        "scheme": None
        if rendered is None or attributes["scheme"] is None
        else colour_family(rendered.background, rendered.accent) == attributes["scheme"],
    }
    for component in attributes["components"]:
        checks[f"component:{component}"] = _has_component(tree, text, component)
    checked = [v for v in checks.values() if v is not None]
    return {**checks, "overall": sum(checked) / len(checked) if checked else 0.0}


def _normalised(page: str) -> str:
    return " ".join(page.split())


def distinct_pages(pages: list[str]) -> float:
    """The share of pages that differ from every other page (whitespace aside)."""
    counts: dict[str, int] = {}
    for page in map(_normalised, pages):
        counts[page] = counts.get(page, 0) + 1
    return sum(counts[_normalised(p)] == 1 for p in pages) / len(pages) if pages else 0.0


def mean_pairwise_similarity(pages: list[str]) -> float:
    """Mean difflib ratio over every pair of pages, line by line (1.0: all the same page)."""
    lines = [[line.strip() for line in page.splitlines() if line.strip()] for page in pages]
    pairs = list(itertools.combinations(lines, 2))
    if not pairs:
        return 1.0
    return sum(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() for a, b in pairs) / len(pairs)


def sameness_warning(generated: list[str], references: list[str]) -> str | None:
    """One plain sentence when the model writes (nearly) one page whatever it is asked; None otherwise."""
    share = distinct_pages(generated)
    if share >= ONE_PAGE_FOR_ALL:
        return None
    return (
        f"The model ignores its prompts: only {share:.0%} of its pages differ from every other page, and its pages "
        f"are {mean_pairwise_similarity(generated):.0%} alike on average where the references are "
        f"{mean_pairwise_similarity(references):.0%} alike. Its averages above describe one page, not a model that "
        f"follows descriptions: train longer or on more varied data."
    )
