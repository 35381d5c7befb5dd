"""Scraped pages: which rows can teach a page (triage), and cleaning that keeps what a browser renders.

Pages scraped from the web are often not the page described: a bot check ("Checking if the site connection is
secure"), a consent wall, an error page, a framework shell that renders nothing until its scripts run. Others
are the page, buried in what the model would have to learn to write and the browser never shows: inline
scripts and JSON state, comments, `data-*` attributes, base64 images, SVG path data. `triage` flags each row
with its reasons; `clean_markup` removes the invisible weight by a policy, leaving every other byte as it was.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# What bot checks, consent walls and error pages say: one place, lower case, matched in the visible text.
CHALLENGE_PHRASES = (
    "checking if the site connection is secure",
    "checking your browser before accessing",
    "verify you are human",
    "verifying you are human",
    "enable javascript and cookies to continue",
    "please enable cookies",
    "attention required! | cloudflare",
    "ddos protection by",
    "access denied",
    "request unsuccessful. incapsula",
    "are you a robot",
    "you need to enable javascript to run this app",  # a framework shell whose scripts never ran
)
CONSENT_PHRASES = ("we value your privacy", "accept all cookies", "manage cookie preferences", "cookie consent")
ERROR_PHRASES = ("404 not found", "page not found", "500 internal server error", "502 bad gateway", "403 forbidden")
ERROR_WORDS = ("404", "error", "not found", "missing", "does not exist", "403", "500")  # a description asking for one

MIN_VISIBLE_WORDS = 1  # a page that renders no word at all: a shell whose scripts never ran
SCRIPT_SHARE = 0.8  # more of the page's bytes than this in <script> and <style>: the model would learn scripts
MIN_DESCRIPTION_WORDS = 4  # "basic landing page" says too little to learn which page to write
UNTEACHABLE = ("not a page", "challenge page", "consent wall", "error page", "empty render")  # dropped by default


@dataclass
class Triage:
    """One row's flags, with the reason for each (empty: nothing found)."""

    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def teachable(self) -> bool:
        return not any(flag in UNTEACHABLE for flag in self.reasons)


def rendered_text(page: str) -> str:
    """The words a browser shows of `page`: no head (its title renders in no page), scripts, styles or comments."""
    for hidden in (r"<head\b.*?</head\s*>", r"<(script|style|template)\b.*?</\1\s*>", r"<!--.*?-->"):
        page = re.sub(hidden, " ", page, flags=re.I | re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", page)).split())


def _script_bytes(page: str) -> int:
    return sum(len(m.group(0)) for m in re.finditer(r"<(script|style)\b.*?</\1\s*>", page, re.I | re.S))


def triage(description: str, page: str, tokens: int | None = None, max_tokens: int | None = None) -> Triage:
    """The flags of one (description, page) row; `tokens` (the cleaned page's) and `max_tokens` (the longest
    example the run keeps whole) add the length flag."""
    flags: dict[str, str] = {}
    lower = page.lower()
    if "<html" not in lower and "<body" not in lower:
        flags["not a page"] = "no <html> or <body> tag"
    text = rendered_text(page).lower()
    words = len(text.split())
    asked_for_error = any(word in description.lower() for word in ERROR_WORDS)
    for flag, phrases in (("challenge page", CHALLENGE_PHRASES), ("consent wall", CONSENT_PHRASES)):
        found = next((p for p in phrases if p in text), None)
        if found and words < 200:  # a whole page that mentions cookies is still the page
            flags[flag] = f"says {found!r}"
    found = next((p for p in ERROR_PHRASES if p in text), None)
    if found and not asked_for_error and words < 200:
        flags["error page"] = f"says {found!r} but the description asks for no error page"
    if words < MIN_VISIBLE_WORDS:
        flags["empty render"] = f"{words} visible word(s)"
    share = _script_bytes(page) / max(len(page), 1)
    if share > SCRIPT_SHARE:
        flags["script-dominated"] = f"{share:.0%} of its bytes are <script> or <style>"
    if tokens is not None and max_tokens is not None and tokens > max_tokens:
        flags["too long"] = f"{tokens} tokens after cleaning, {max_tokens} kept whole"
    if len(description.split()) < MIN_DESCRIPTION_WORDS:
        flags["short description"] = f"{len(description.split())} word(s)"
    return Triage(flags)


def triage_counts(results: list[Triage]) -> dict[str, int]:
    """Rows flagged, by reason (a row may have several)."""
    counts: dict[str, int] = {}
    for result in results:
        for flag in result.reasons:
            counts[flag] = counts.get(flag, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


CLEANING = ("none", "safe", "aggressive")
PLACEHOLDER_URL = "placeholder.png"
_TAG = re.compile(r"<[a-zA-Z][^<>]*>")
_KEEP_AS_IS = re.compile(r"(<(pre|textarea)\b.*?</\2\s*>)", re.I | re.S)  # whitespace that renders
_HASHED_CLASS = re.compile(r"^(?:sc-[A-Za-z0-9]+|css-[a-z0-9]{5,}|(?=[A-Za-z]*[A-Z])(?=[A-Za-z]*[a-z])[A-Za-z]{5,7})$")


def _in_tags(page: str, edit) -> str:
    return _TAG.sub(lambda m: edit(m.group(0)), page)


def _drop_hashed_classes(tag: str) -> str:
    def keep(match: re.Match) -> str:
        names = [name for name in match.group(2).split() if not _HASHED_CLASS.match(name)]
        return f"{match.group(1)}{' '.join(names)}{match.group(3)}" if names else ""

    return re.sub(r"""(\sclass\s*=\s*["'])([^"']*)(["'])""", keep, tag)


def _clean_outside_pre(part: str, policy: str) -> str:
    part = re.sub(r"<!--(?!\[if).*?-->", "", part, flags=re.S)  # comments (IE's conditional ones stay)
    json_types = r"""type\s*=\s*["']?application/(?:ld\+)?json"""
    part = re.sub(rf"<script\b[^>]*{json_types}[^>]*>.*?</script\s*>", "", part, flags=re.I | re.S)  # inline state
    part = re.sub(r"(<script\b[^>]*>).*?(</script\s*>)", r"\1\2", part, flags=re.I | re.S)  # script bodies
    part = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=\n\r]+", PLACEHOLDER_URL, part)
    part = _in_tags(part, lambda tag: re.sub(r"""\sdata-[\w.:-]+(\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""", "", tag))
    if policy == "aggressive":
        part = re.sub(r"(<svg\b.*?</svg\s*>)", lambda m: re.sub(r"""\sd\s*=\s*("[^"]*"|'[^']*')""", ' d=""',
                      m.group(1)), part, flags=re.I | re.S)  # fmt: skip
        part = _in_tags(part, _drop_hashed_classes)
    # runs of HTML's own whitespace between tags render as one (not a no-break space: that one shows)
    return re.sub(r">[ \t\n\r\f]+<", lambda m: ">\n<" if "\n" in m.group(0) else "> <", part)


def clean_markup(page: str, policy: str = "safe") -> str:
    """`page` without what the browser never shows, by `policy`:

    - `none`: as it is;
    - `safe`: comments, inline script bodies and JSON state, `data-*` attributes and base64 payloads (a short
      placeholder URL in their place) go, and runs of whitespace between tags become one (inside `<pre>` and
      `<textarea>`, where whitespace renders, nothing changes);
    - `aggressive`: also SVG path data and hashed class names (`sc-AxjAm kITaNo`), which CSS in the page may use:
      the rendering can change.
    """
    if policy not in CLEANING:
        raise ValueError(f"page_cleaning must be one of {', '.join(CLEANING)}, not {policy!r}")
    if policy == "none":
        return page
    parts = _KEEP_AS_IS.split(page)
    # split() with two groups gives [outside, whole pre, tag name, outside, ...]
    out = []
    for index in range(0, len(parts), 3):
        out.append(_clean_outside_pre(parts[index], policy))
        if index + 1 < len(parts):
            out.append(parts[index + 1])
    return "".join(out)


def triage_and_clean(dataset, drop_unteachable: bool, policy: str):
    """Triage every (label, html) row of `dataset`, drop the unteachable ones if asked, clean the pages by
    `policy`. Returns the dataset, the flag counts of all rows and the counts of the rows dropped, by reason."""
    results = [triage(row["label"], row["html"]) for row in dataset]
    keep = [index for index, result in enumerate(results) if result.teachable or not drop_unteachable]
    dropped = triage_counts(
        [Triage({k: v for k, v in r.reasons.items() if k in UNTEACHABLE}) for r in results if not r.teachable]
    ) if drop_unteachable else {}  # fmt: skip
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    if policy != "none":
        dataset = dataset.map(lambda batch: {"html": [clean_markup(page, policy) for page in batch["html"]]},
                              batched=True, desc=f"page_cleaning={policy}")  # fmt: skip
    return dataset, triage_counts(results), dropped
