"""Stage 5b: how good are the pages? ROUGE, plus what ROUGE cannot see: structure, validity, and checks that need
no reference page. (Scores of the *rendered* pages are in `layout`.) README's evaluation table gives every range.

* ROUGE-1/2/L(sum) come from `rouge_score`, the implementation `evaluate`'s `rouge` metric wraps, with
  the same defaults (no stemmer, its default tokenizer). `evaluate` reports a bootstrap median by default
  (random resampling); we report the plain **mean F-measure over examples** -- what
  `evaluate.load("rouge").compute(..., use_aggregator=False)` returns, averaged -- which is deterministic.
  ROUGE's tokenizer lower-cases and turns every non-alphanumeric character into a space, so all markup
  punctuation (`< > / = "`) vanishes: `<div><p>Hi</div></p>` and `div p hi div p` score the same. Nesting,
  closing tags and well-formedness are invisible to it.
* `text_rougeL`: ROUGE-L on the visible text only (tags, CSS and scripts removed): the words a reader sees.
* `html_valid_rate`: pages with no parse error by the HTML standard (`spec_errors`, html5lib);
  `html_well_formed_rate`: the stricter rule that every element is explicitly closed (`html_problems`).
* Structure: `tag_similarity` (difflib ratio of the tag sequences), `tree_bleu` (WebCode2M's TreeBLEU) and
  `tree_edit_similarity` (1 - normalised Zhang-Shasha tree edit distance between the DOMs).
* No reference needed: `description_coverage`, `repetition` (and a runaway flag), `ends_with_html`.
* Does the page follow its description (`prompt_following`): `follows_description` and the kind, brand, colour
  and component checks for data whose rows carry attributes (the bundled data); `distinct_pages` and the pages'
  mean pairwise similarity beside the references', for every dataset.
* `paired_gain`: fine-tuned minus base on one per-page score, with a bootstrap interval over the pages.
* token accuracy / loss: next-token accuracy on the held-out *test* split under teacher forcing (`loss`).
"""

from __future__ import annotations

import difflib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from .prompt_following import distinct_pages, follows_description, mean_pairwise_similarity, requested_attributes

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)


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
        self.attribute_values: list[str] = []  # alt, title, class, id... (not style, scripts or links)
        self._skip_text = 0

    def _keep_attributes(self, attrs):
        self.attribute_values += [
            value
            for name, value in attrs
            if value and name not in ("style", "href", "src", "action") and not name.startswith("on")
        ]

    def handle_decl(self, decl):
        self.events.append(("decl", decl.strip().lower()))

    def handle_starttag(self, tag, attrs):
        self.events.append(("start", tag))
        self._keep_attributes(attrs)
        if tag in ("style", "script"):
            self._skip_text += 1

    def handle_startendtag(self, tag, attrs):
        self.events.append(("startend", tag))
        self._keep_attributes(attrs)

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
                    del stack[len(stack) - 1 - stack[::-1].index(value) :]
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


# ---------------------------------------------------------------------------------------------- the HTML spec
def spec_errors(page: str) -> list[str]:
    """The HTML standard's parse errors in `page` (html5lib implements the spec's tokenizer and tree builder): a
    missing doctype, misnested or unclosed elements, stray end tags, text after `</html>`... Allowed by the spec,
    so not errors: end tags authors may omit (`</p>`, `</li>`, `</body>`, `</html>`), self-closing tags in SVG and
    MathML, tag-like text inside `<title>` and `<textarea>`."""
    import html5lib

    parser = html5lib.HTMLParser(strict=False)
    parser.parse(page)
    return [code for _, code, _ in parser.errors]


def is_valid_html(page: str) -> bool:
    return bool(page.strip()) and not spec_errors(page)


def dom_tree(page: str):
    """The page's element tree as browsers build it (html5lib, the spec's tree construction), comments dropped."""
    import html5lib

    return html5lib.parse(page, treebuilder="etree", namespaceHTMLElements=False)


def _elements(tree) -> list:
    return [node for node in tree.iter() if isinstance(node.tag, str)]


def tree_bleu(generated: str, reference: str) -> float:
    """TreeBLEU (WebCode2M, Gui et al. 2024): the share of the reference DOM's height-1 subtrees -- an element
    with the ordered tags of its element children -- that the generated DOM also has. 1.0 = every parent-children
    pattern of the reference is there."""

    def subtrees(page: str) -> set[tuple]:
        found = set()
        for node in _elements(dom_tree(page)):
            children = tuple(child.tag for child in node if isinstance(child.tag, str))
            if children:
                found.add((node.tag, children))
        return found

    wanted, have = subtrees(reference), subtrees(generated)
    if not wanted:
        return 1.0 if not have else 0.0
    return len(wanted & have) / len(wanted)


TREE_EDIT_MAX_NODES = 400  # Zhang-Shasha is quadratic or worse in nodes: larger DOMs are compared on their first 400


def tree_edit_similarity(generated: str, reference: str, max_nodes: int = TREE_EDIT_MAX_NODES) -> float:
    """1 - (tree edit distance between the two DOMs of element tags) / (the sum of their sizes), with `zss`'s
    Zhang-Shasha algorithm (insert, delete and relabel cost 1 each). 1.0 = the same tree of tags; 0.0 = deleting
    every element and inserting the other tree's is the cheapest edit (the distance never exceeds that sum, so the
    score stays within [0, 1]). Each DOM is taken in document order up to `max_nodes` elements."""
    import zss

    def as_zss(page: str) -> tuple[zss.Node, int]:
        count = [0]

        def convert(element):
            count[0] += 1
            node = zss.Node(element.tag)
            for child in element:
                if isinstance(child.tag, str) and count[0] < max_nodes:
                    node.addkid(convert(child))
            return node

        return convert(dom_tree(page)), count[0]

    (a, size_a), (b, size_b) = as_zss(generated), as_zss(reference)
    return 1.0 - zss.simple_distance(a, b) / (size_a + size_b)


# ---------------------------------------------------------------------------------------------- no reference needed
# Words of a description that say what to do, not what the page is about
INSTRUCTION_WORDS = frozenset(
    """a an the and or of for with to in on at by from as is are be it its this that my our
your me i we you please create make build write code generate design give need want show produce html page website
web site simple some using use which should would like can could just new one has have add include includes
including featuring style look colour colours color colors scheme theme""".split()
)


def content_words(description: str) -> list[str]:
    """The description's content words: its words without function words and instruction words ("create",
    "page", "please"...). A stand-in for its nouns and adjectives that needs no tagger model."""
    words = [re.sub(r"'s$", "", w).strip("'-") for w in re.findall(r"[a-z0-9][a-z0-9'-]*", description.lower())]
    return list(dict.fromkeys(w for w in words if w not in INSTRUCTION_WORDS and len(w) > 1))


def description_coverage(description: str, page: str) -> float:
    """The share of the description's content words that the page shows: in its visible text or in its
    attributes (alt, title, class, ids...). 1.0 when the description has none."""
    words = content_words(description)
    if not words:
        return 1.0
    parsed = _parse(page)
    haystack = (" ".join(parsed.text_parts) + " " + " ".join(parsed.attribute_values)).lower()
    present = set(re.findall(r"[a-z0-9][a-z0-9'-]*", haystack))
    return sum(w in present for w in words) / len(words)


def repetition(page: str) -> dict[str, float | bool]:
    """How much the page repeats itself: the share of its non-blank lines that repeat an earlier line, the share
    of its 4-grams of tokens seen before (tags, and words cut into pieces of at most 16 characters, so that a
    one-line `<------...` repeats), and `runaway`, a generation stuck in a loop: the same line 8 or more times in
    a row, 4-grams 90% repeats, or a page whose last 256 characters are one cycle of at most 64."""
    lines = [line.strip() for line in page.splitlines() if line.strip()]
    seen, repeated_lines, run, longest_run = set(), 0, 1, 1
    for index, line in enumerate(lines):
        repeated_lines += line in seen
        seen.add(line)
        run = run + 1 if index and line == lines[index - 1] else 1
        longest_run = max(longest_run, run)
    tokens = re.findall(r"<[^>]*>|[^\s<>]{1,16}", page)
    grams = [tuple(tokens[i : i + 4]) for i in range(max(0, len(tokens) - 3))]
    repeated_grams = len(grams) - len(set(grams))
    line_share = repeated_lines / len(lines) if lines else 0.0
    gram_share = repeated_grams / len(grams) if grams else 0.0
    return {
        "repeated_line_share": line_share,
        "repeated_4gram_share": gram_share,
        "runaway": longest_run >= 8 or gram_share >= 0.9 or ends_in_a_cycle(page),
    }


def ends_in_a_cycle(page: str, window: int = 256, longest: int = 64) -> bool:
    """Whether the page's last `window` characters (trailing whitespace aside) are one cycle of at most `longest`
    characters: the end of a generation that looped to its token limit, on one line or many."""
    tail = page.rstrip()[-window:]
    return len(tail) == window and any(tail[period:] == tail[:-period] for period in range(1, longest + 1))


def ends_with_html(page: str) -> bool:
    return page.rstrip().lower().endswith("</html>")


# ---------------------------------------------------------------------------------------------- all together
LAYOUT_KEYS = ("block_match", "text_similarity", "position_similarity", "color_similarity")


def score_pages(
    descriptions: list[str],
    generated: list[str],
    references: list[str],
    layout: bool = True,
    visual: bool = False,
    clip_model: str | None = None,
):
    """A per-page DataFrame of every score, and the means (rates for yes/no checks) over the pages.

    `layout` adds the rendered-page scores (Design2Code's four, and whether the page renders non-blank) when a
    Chromium is found, and Design2Code's CLIP score when `clip_model` (default: its ViT-B/32) loads; otherwise the
    summary says why they are missing. `visual` adds the screenshot score."""
    import pandas as pd

    from . import layout as rendered

    per_rouge = rouge_per_example(generated, references)
    text_rouge = rouge_per_example([visible_text(p) for p in generated], [visible_text(p) for p in references])
    repeats = [repetition(p) for p in generated]
    table = pd.DataFrame(
        {
            "description": descriptions,
            "reference": references,
            "generated": generated,
            **{t: per_rouge[t] for t in ("rouge1", "rouge2", "rougeL")},
            "text_rougeL": text_rouge["rougeL"],
            "valid_html": [is_valid_html(p) for p in generated],
            "well_formed": [is_well_formed(p) for p in generated],
            "problems": ["; ".join(spec_errors(p)[:3]) if p.strip() else "empty page" for p in generated],
            "tag_similarity": [tag_similarity(g, r) for g, r in zip(generated, references)],
            "tree_bleu": [tree_bleu(g, r) for g, r in zip(generated, references)],
            "tree_edit_similarity": [tree_edit_similarity(g, r) for g, r in zip(generated, references)],
            "description_coverage": [description_coverage(d, p) for d, p in zip(descriptions, generated)],
            "repeated_4gram_share": [r["repeated_4gram_share"] for r in repeats],
            "runaway_repetition": [r["runaway"] for r in repeats],
            "ends_with_html": [ends_with_html(p) for p in generated],
            "generated_chars": [len(p) for p in generated],
            "reference_chars": [len(p) for p in references],
        }
    )
    summary = {t: float(np.mean(per_rouge[t])) for t in ROUGE_TYPES}
    for column, name in (
        ("text_rougeL", "text_rougeL"),
        ("valid_html", "html_valid_rate"),
        ("well_formed", "html_well_formed_rate"),
        ("tag_similarity", "tag_similarity"),
        ("tree_bleu", "tree_bleu"),
        ("tree_edit_similarity", "tree_edit_similarity"),
        ("description_coverage", "description_coverage"),
        ("repeated_4gram_share", "repeated_4gram_share"),
        ("runaway_repetition", "runaway_repetition_rate"),
        ("ends_with_html", "ends_with_html_rate"),
    ):
        summary[name] = float(table[column].mean())
    summary["examples"] = len(table)
    summary["distinct_pages"] = distinct_pages(generated)
    summary["pairwise_similarity"] = mean_pairwise_similarity(generated)
    summary["reference_pairwise_similarity"] = mean_pairwise_similarity(references)
    chromium = rendered.find_chromium() if layout or visual else None
    gen_pages = None
    if layout and chromium is None:
        summary["layout_scores"] = f"skipped: {rendered.NO_CHROMIUM}"
        print(f"layout scores skipped: {rendered.NO_CHROMIUM}")
    elif layout:
        pages = rendered.render_pages(list(generated) + list(references), chromium)
        gen_pages, ref_pages = pages[: len(generated)], pages[len(generated) :]
        scores = [rendered.layout_scores(g, r) for g, r in zip(gen_pages, ref_pages)]
        for key in LAYOUT_KEYS:
            table[key] = [s[key] for s in scores]
            summary[key] = float(table[key].mean())
        table["renders_non_blank"] = [p.non_blank for p in gen_pages]
        summary["renders_non_blank_rate"] = float(table["renders_non_blank"].mean())
        summary["layout_scores"] = "chromium"
        clip, reason = rendered.load_clip(clip_model or rendered.CLIP_MODEL)
        if clip is None:
            summary["clip_score"] = reason
        else:
            table["clip"] = [rendered.clip_similarity(g, r, clip, chromium) for g, r in zip(generated, references)]
            summary["clip"] = float(table["clip"].mean())
            summary["clip_score"] = clip_model or rendered.CLIP_MODEL
    attributes = requested_attributes(descriptions)
    if attributes is not None:
        follows = [
            follows_description(a, p, None if gen_pages is None else gen_pages[i])
            for i, (a, p) in enumerate(zip(attributes, generated))
        ]
        table["follows_description"] = [f["overall"] for f in follows]
        summary["follows_description"] = float(table["follows_description"].mean())
        for check in ("kind", "brand", "scheme"):
            checked = [f[check] for f in follows if f[check] is not None]
            if checked:  # a scheme is checked only where the description names a colour
                table[f"{check}_right"] = [f[check] for f in follows]
                summary[f"{check}_right_rate"] = sum(checked) / len(checked)
        asked = [v for f in follows for k, v in f.items() if k.startswith("component:")]
        summary["components_present_rate"] = sum(asked) / len(asked) if asked else 1.0
    if visual and chromium is not None:
        table["visual_similarity"] = [rendered.visual_similarity(g, r, chromium) for g, r in zip(generated, references)]
        summary["visual_similarity"] = float(table["visual_similarity"].mean())
    return table, summary


def paired_gain(scores, base_scores, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """How much better than the base, per page, with a bootstrap interval (`scipy.stats.bootstrap`, percentile,
    seeded) over these pages: the mean of `scores - base_scores` and where it could lie on another draw of as many
    prompts. On the 12 pages of a quick evaluation that interval is wide; the learner should see how wide."""
    from scipy.stats import bootstrap

    gains = np.asarray(scores, dtype=float) - np.asarray(base_scores, dtype=float)
    mean = float(gains.mean())
    if np.all(gains == gains[0]):  # every page gained the same: no spread to resample
        low = high = mean
    else:
        interval = bootstrap(
            (gains,), np.mean, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed)
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"gain": mean, "low": low, "high": high, "confidence": confidence, "pages": len(gains)}


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    path = Path(run_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path
