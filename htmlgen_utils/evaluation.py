"""Stage 5b: how good are the pages? ROUGE, plus the HTML-aware scores ROUGE cannot see.

* ROUGE-1/2/L(sum) come from `rouge_score`, the implementation `evaluate`'s `rouge` metric wraps, with
  the same defaults (no stemmer, its default tokenizer). `evaluate` reports a bootstrap median by default
  (random resampling); we report the plain **mean F-measure over examples** -- what
  `evaluate.load("rouge").compute(..., use_aggregator=False)` returns, averaged -- which is deterministic.
  ROUGE's tokenizer lower-cases and turns every non-alphanumeric character into a space, so all markup
  punctuation (`< > / = "`) vanishes: `<div><p>Hi</div></p>` and `div p hi div p` score the same. Nesting,
  closing tags and well-formedness are invisible to it.
* `text_rougeL`: ROUGE-L on the visible text only (tags, CSS and scripts removed): the words a reader sees.
* `html_valid_rate`: the share of pages that are well-formed documents (definition in `html_problems`).
* `tag_similarity`: how alike the two pages' tag sequences are (`difflib` ratio over start/end tags).
* `visual_similarity` (optional): both pages screenshotted in headless Chromium, pixels compared.
* token accuracy / loss: next-token accuracy on the held-out *test* split under teacher forcing.
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
VOID_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                           "track", "wbr"})


# ---------------------------------------------------------------------------------------------- ROUGE
def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures, exactly as `evaluate`'s rouge with use_aggregator=False."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {t: [s[t].fmeasure for s in scores] for t in ROUGE_TYPES}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measure over examples (see the module docstring for why not the bootstrap median)."""
    per_example = rouge_per_example(predictions, references)
    return {t: float(np.mean(v)) if v else 0.0 for t, v in per_example.items()}


# ---------------------------------------------------------------------------------------------- HTML structure
class _TagCollector(HTMLParser):
    """Collects the token stream of a page with Python's standard HTML tokenizer."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[tuple[str, str]] = []  # (kind, value): start/end/text/decl/startend
        self.text_parts: list[str] = []
        self._skip_text = 0

    def handle_decl(self, decl):
        self.events.append(("decl", decl.strip().lower()))

    def handle_starttag(self, tag, attrs):
        self.events.append(("start", tag))
        if tag in ("style", "script"):
            self._skip_text += 1

    def handle_startendtag(self, tag, attrs):
        self.events.append(("startend", tag))

    def handle_endtag(self, tag):
        self.events.append(("end", tag))
        if tag in ("style", "script") and self._skip_text:
            self._skip_text -= 1

    def handle_data(self, data):
        if data.strip():
            self.events.append(("text", data.strip()))
            if not self._skip_text:
                self.text_parts.append(data.strip())


def _parse(page: str) -> _TagCollector:
    collector = _TagCollector()
    collector.feed(page)
    collector.close()
    return collector


def html_problems(page: str) -> list[str]:
    """Why `page` is not a well-formed HTML document (an empty list means it is).

    Well-formed, precisely (checked on the token stream of Python's `html.parser`, the standard library's
    HTML tokenizer; we use a tokenizer plus explicit rules rather than a browser-grade parser such as
    html5lib, because those *repair* any input by the HTML5 error-recovery rules and so accept everything):
      1. the document starts with `<!DOCTYPE html>` (only whitespace before it);
      2. one `<html>` element encloses everything else, with a `<head>` and then a `<body>` inside it;
      3. every element except the void ones (`br`, `img`, `input`, `meta`, ...) is closed by its own end tag,
         and elements nest properly (an end tag always closes the most recently opened element);
      4. no end tag without a matching open element, no void element with an end tag;
      5. no text or tags after `</html>`, and no text outside `<body>`/`<head>`.
    """
    problems: list[str] = []
    if not page.strip():
        return ["empty page"]
    events = _parse(page).events
    if not events or events[0] != ("decl", "doctype html"):
        problems.append("does not start with <!DOCTYPE html>")
    stack: list[str] = []
    seen_html_end = False
    top_level: list[str] = []
    html_children: list[str] = []
    for kind, value in events[1:] if events and events[0][0] == "decl" else events:
        if seen_html_end:
            problems.append(f"content after </html>: {kind} {value[:30]!r}")
            break
        if kind == "start":
            if value in VOID_ELEMENTS:
                continue
            if not stack:
                top_level.append(value)
            elif stack == ["html"]:
                html_children.append(value)
            stack.append(value)
        elif kind == "startend":
            if value not in VOID_ELEMENTS:
                problems.append(f"<{value}/> is not a void element and must have an end tag")
        elif kind == "end":
            if value in VOID_ELEMENTS:
                problems.append(f"end tag </{value}> for a void element")
            elif not stack:
                problems.append(f"end tag </{value}> with no open element")
            elif stack[-1] != value:
                problems.append(f"</{value}> closes <{stack[-1]}>: improper nesting or a missing </{stack[-1]}>")
                if value in stack:  # recover so one mistake is reported once
                    del stack[len(stack) - 1 - stack[::-1].index(value):]
            else:
                stack.pop()
                if value == "html" and not stack:
                    seen_html_end = True
        elif kind == "text" and (not stack or stack == ["html"]):
            problems.append(f"text outside <head>/<body>: {value[:30]!r}")
        elif kind == "decl":
            problems.append("a second <!DOCTYPE>")
    if stack:
        problems.append("unclosed element(s) at the end: " + ", ".join(f"<{t}>" for t in stack))
    if top_level != ["html"]:
        problems.append(f"the document's top-level elements are {top_level}, expected one <html>")
    elif html_children[:2] != ["head", "body"] or len(html_children) != 2:
        problems.append(f"<html> holds {html_children}, expected <head> then <body>")
    if not seen_html_end and "unclosed" not in " ".join(problems):
        problems.append("no </html> end tag")
    return problems


def is_well_formed(page: str) -> bool:
    return not html_problems(page)


def tag_sequence(page: str) -> list[str]:
    """Start and end tags in document order (`div`, `/div`): the page's structure without its words."""
    return [("/" + v if k == "end" else v) for k, v in _parse(page).events if k in ("start", "end", "startend")]


def tag_similarity(generated: str, reference: str) -> float:
    """difflib's ratio of matching tags between the two tag sequences: 1.0 = identical structure."""
    a, b = tag_sequence(generated), tag_sequence(reference)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def visible_text(page: str) -> str:
    """The words a reader sees: text outside tags, without CSS and scripts."""
    return " ".join(_parse(page).text_parts)


# ---------------------------------------------------------------------------------------------- visual score
# Headless, no network, no first-run work; each call also gets a fresh --user-data-dir.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars")


def find_chromium() -> str | None:
    """Debian's `chromium`, another Chrome on PATH, $HTMLGEN_CHROMIUM, or Playwright's download (Colab)."""
    candidates = [os.environ.get("HTMLGEN_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
                  "google-chrome-stable"]
    for name in candidates:
        if name and (path := shutil.which(name) or (name if os.path.isfile(name) else None)):
            return path
    for path in sorted(Path.home().glob(".cache/ms-playwright/chromium-*/chrome-linux*/chrome")):
        return str(path)
    return None


def screenshot(page: str, out_png: str | Path, width: int = 800, height: int = 600, chromium: str | None = None,
               timeout: float = 60.0) -> Path:
    """Render `page` headless and save a PNG of the viewport. The page is shown the way the notebooks show it, in a
    sandboxed iframe (no scripts, no same origin) filling the window, and the browser has no network."""
    from .rendering import iframe_html

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("No Chromium found: install Debian's `chromium` (apt-get install chromium), or on Colab "
                           "`pip install playwright && playwright install chromium`, or set HTMLGEN_CHROMIUM")
    out_png = Path(out_png).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        html_file = Path(tmp) / "page.html"
        html_file.write_text("<!DOCTYPE html><html><head><style>html,body{margin:0;overflow:hidden}</style></head>"
                             f"<body>{iframe_html(page, height, f'{width}px', style='border:0;display:block')}"
                             "</body></html>", encoding="utf-8")
        command = [chromium, *CHROMIUM_FLAGS,
                   "--virtual-time-budget=2000", f"--user-data-dir={tmp}/profile",
                   f"--window-size={width},{height}", f"--screenshot={out_png}", html_file.as_uri()]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)
    if not out_png.exists():
        raise RuntimeError(f"Chromium did not write {out_png}")
    return out_png


def image_similarity(png_a: str | Path, png_b: str | Path) -> float:
    """1 - mean absolute difference of the two grayscale images at 200x150 (1.0 = identical pixels)."""
    from PIL import Image

    def load(path):
        return np.asarray(Image.open(path).convert("L").resize((200, 150)), dtype=np.float32) / 255.0

    return float(1.0 - np.abs(load(png_a) - load(png_b)).mean())


def visual_similarity(generated: str, reference: str, chromium: str | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        a = screenshot(generated, Path(tmp) / "a.png", chromium=chromium)
        b = screenshot(reference, Path(tmp) / "b.png", chromium=chromium)
        return image_similarity(a, b)


# ---------------------------------------------------------------------------------------------- all together
def score_pages(descriptions: list[str], generated: list[str], references: list[str], visual: bool = False):
    """A per-example DataFrame of every score, and the dataset-level means."""
    import pandas as pd

    per_rouge = rouge_per_example(generated, references)
    text_rouge = rouge_per_example([visible_text(p) for p in generated], [visible_text(p) for p in references])
    table = pd.DataFrame({
        "description": descriptions, "reference": references, "generated": generated,
        **{t: per_rouge[t] for t in ("rouge1", "rouge2", "rougeL")},
        "text_rougeL": text_rouge["rougeL"],
        "well_formed": [is_well_formed(p) for p in generated],
        "problems": ["; ".join(html_problems(p)[:3]) for p in generated],
        "tag_similarity": [tag_similarity(g, r) for g, r in zip(generated, references)],
        "generated_chars": [len(p) for p in generated], "reference_chars": [len(p) for p in references],
    })
    summary = {t: float(np.mean(per_rouge[t])) for t in ROUGE_TYPES}
    summary.update(text_rougeL=float(table["text_rougeL"].mean()), html_valid_rate=float(table["well_formed"].mean()),
                   tag_similarity=float(table["tag_similarity"].mean()), examples=len(table))
    if visual:
        chromium = find_chromium()
        if chromium is None:
            print("visual score skipped: no Chromium found (apt-get install chromium; on Colab: pip install "
                  "playwright && playwright install chromium)")
        else:
            table["visual_similarity"] = [visual_similarity(g, r, chromium) for g, r in zip(generated, references)]
            summary["visual_similarity"] = float(table["visual_similarity"].mean())
    return table, summary


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    path = Path(run_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path
