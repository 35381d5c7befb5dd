"""Scores of rendered pages: what a reader sees, measured in headless Chromium with the pages' scripts off.

* Design2Code's low-level visual metrics (Si et al., 2024): the text blocks of both rendered pages (found in the
  rendered DOM by a script of ours, with their boxes and text colours), matched one-to-one by text similarity
  (Hungarian matching, pairs below 0.5 similarity left unmatched), then
  - `block_match`: the area of matched blocks / the area of all blocks of both pages (unmatched text costs);
  - `text_similarity`: mean character similarity (difflib ratio) of matched blocks;
  - `position_similarity`: mean of 1 - max(|dx|, |dy|) of matched blocks' centres, in page-normalised units;
  - `color_similarity`: mean of 1 - CIEDE2000(text colours) / 100 over matched blocks.
* `renders_non_blank`: the page shows some text or some visible box.
* `visual_similarity`: the two viewport screenshots' grayscale pixels compared.

Pages render in `<iframe sandbox="allow-same-origin">` frames (no `allow-scripts`: their scripts never run, while
our script in the host page can read their layout), under a policy that fetches nothing but inline styles and
`data:` images. Chromium is Debian's `chromium`, another Chrome on PATH, $HTMLGEN_CHROMIUM, or Playwright's
download (Colab: `pip install playwright && playwright install chromium`); without one, callers skip these scores.
"""

from __future__ import annotations

import difflib
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Headless, no network, no first-run work; each call also gets a fresh --user-data-dir.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
)
VIEWPORT = (1280, 800)
MATCH_THRESHOLD = 0.5  # Design2Code's: blocks less alike than this are not a pair


def find_chromium() -> str | None:
    """Debian's `chromium`, another Chrome on PATH, $HTMLGEN_CHROMIUM, or Playwright's download (Colab)."""
    candidates = [
        os.environ.get("HTMLGEN_CHROMIUM", ""),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    for name in candidates:
        if name and (path := shutil.which(name) or (name if os.path.isfile(name) else None)):
            return path
    for path in sorted(Path.home().glob(".cache/ms-playwright/chromium-*/chrome-linux*/chrome")):
        return str(path)
    return None


NO_CHROMIUM = (
    "No Chromium found: install Debian's `chromium` (apt-get install chromium), or on Colab `pip install "
    "playwright && playwright install chromium`, or set HTMLGEN_CHROMIUM"
)


def _run_chromium(args: list[str], chromium: str | None, timeout: float) -> str:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError(NO_CHROMIUM)
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return result.stdout


# ---------------------------------------------------------------------------------------------- text blocks
@dataclass
class TextBlock:
    text: str
    x: float  # left, top, width, height as shares of the page's width and height
    y: float
    width: float
    height: float
    color: tuple[int, int, int]

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2


@dataclass
class RenderedPage:
    blocks: list[TextBlock]
    visible_boxes: int  # elements with a visible box of their own: images, backgrounds, borders, controls
    background: tuple[int, int, int] | None = None  # the body's computed background colour
    accent: tuple[int, int, int] | None = None  # the most saturated background or border colour drawn

    @property
    def non_blank(self) -> bool:
        return bool(self.blocks) or self.visible_boxes > 0


# Runs in the host page once every frame has loaded: for each frame, its text blocks (the direct text of each
# element, merged per element) with boxes and colours, and how many elements draw a visible box.
_MEASURE = r"""
function measure(frame) {
  const doc = frame.contentDocument, win = frame.contentWindow;
  if (!doc || !doc.body) return {blocks: [], boxes: 0, width: 1, height: 1, background: null, accent: null};
  const skip = new Set(['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE', 'TITLE', 'HEAD']);
  const shown = (el) => { const s = win.getComputedStyle(el);
    return s.display !== 'none' && s.visibility !== 'hidden' && parseFloat(s.opacity) !== 0; };
  const perElement = new Map(), blocks = [];
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, el = node.parentElement, text = node.textContent.replace(/\s+/g, ' ').trim();
    if (!text || !el || skip.has(el.tagName) || !shown(el)) continue;
    const range = doc.createRange(); range.selectNodeContents(node);
    const r = range.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) continue;
    let b = perElement.get(el);
    if (!b) { b = {text: '', x0: r.left, y0: r.top, x1: r.right, y1: r.bottom, color: win.getComputedStyle(el).color};
              perElement.set(el, b); blocks.push(b); }
    b.text += (b.text ? ' ' : '') + text;
    b.x0 = Math.min(b.x0, r.left); b.y0 = Math.min(b.y0, r.top);
    b.x1 = Math.max(b.x1, r.right); b.y1 = Math.max(b.y1, r.bottom);
  }
  let boxes = 0;
  for (const el of doc.body.querySelectorAll('*')) {
    if (skip.has(el.tagName) || !shown(el)) continue;
    const r = el.getBoundingClientRect(), s = win.getComputedStyle(el);
    if (r.width < 2 || r.height < 2) continue;
    const drawn = ['IMG', 'SVG', 'CANVAS', 'VIDEO', 'INPUT', 'BUTTON', 'TEXTAREA', 'SELECT']
        .includes(el.tagName.toUpperCase())
      || !/rgba\(0, 0, 0, 0\)|transparent/.test(s.backgroundColor) || s.backgroundImage !== 'none'
      || parseFloat(s.borderTopWidth) > 0;
    if (drawn) boxes++;
  }
  // the page's colours: its background, and its accent (the most saturated background or border colour drawn)
  const opaque = (c) => c && !/rgba\(0, 0, 0, 0\)|transparent/.test(c);
  const bodyBg = win.getComputedStyle(doc.body).backgroundColor;
  const background = opaque(bodyBg) ? bodyBg : win.getComputedStyle(doc.documentElement).backgroundColor;
  let accent = null, best = -1;
  for (const el of doc.body.querySelectorAll('*')) {
    if (skip.has(el.tagName) || !shown(el)) continue;
    const s = win.getComputedStyle(el);
    for (const c of [s.backgroundColor, parseFloat(s.borderTopWidth) > 0 ? s.borderTopColor : null,
                     parseFloat(s.borderBottomWidth) > 0 ? s.borderBottomColor : null]) {
      if (!opaque(c)) continue;
      const v = (c.match(/[\d.]+/g) || []).slice(0, 3).map(Number);
      const saturation = Math.max(...v) - Math.min(...v);
      if (saturation > best) { best = saturation; accent = c; }
    }
  }
  const width = Math.max(doc.documentElement.scrollWidth, win.innerWidth, 1);
  const height = Math.max(doc.documentElement.scrollHeight, win.innerHeight, 1);
  return {blocks: blocks.map(b => ({text: b.text, x: b.x0 / width, y: b.y0 / height, width: (b.x1 - b.x0) / width,
                                    height: (b.y1 - b.y0) / height, color: b.color})), boxes, width, height,
          background, accent};
}
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'htmlgen-measurements';
  out.textContent = JSON.stringify([...document.querySelectorAll('iframe')].map(measure));
  document.body.appendChild(out);
});
"""


def _color(css: str) -> tuple[int, int, int]:
    values = re.findall(r"[\d.]+", css)
    return tuple(int(round(float(v))) for v in values[:3]) if len(values) >= 3 else (0, 0, 0)


def render_pages(pages: list[str], chromium: str | None = None, timeout: float = 120.0) -> list[RenderedPage]:
    """Render every page at 1280x800 in one headless Chromium and read its text blocks and boxes."""
    width, height = VIEWPORT
    frames = "".join(
        f'<iframe sandbox="allow-same-origin" width="{width}" height="{height}" '
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
        for page in pages
    )
    # srcdoc frames inherit this policy: only our inline script runs, and pages fetch nothing from anywhere
    host = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
        f'font-src data:"></head><body>{frames}<script>{_MEASURE}</script></body></html>'
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "host.html"
        path.write_text(host, encoding="utf-8")
        dom = _run_chromium(
            ["--virtual-time-budget=5000", f"--window-size={width + 40},{height}", "--dump-dom", path.as_uri()],
            chromium,
            timeout,
        )
    found = re.search(r'<pre id="htmlgen-measurements">(.*?)</pre>', dom, re.DOTALL)
    if not found:
        raise RuntimeError("Chromium rendered the pages but returned no measurements")
    measured = json.loads(html.unescape(found.group(1)))
    return [
        RenderedPage(
            [TextBlock(b["text"], b["x"], b["y"], b["width"], b["height"], _color(b["color"])) for b in m["blocks"]],
            m["boxes"],
            _color(m["background"]) if m.get("background") else None,
            _color(m["accent"]) if m.get("accent") else None,
        )
        for m in measured
    ]


# ---------------------------------------------------------------------------------------------- Design2Code metrics
def ciede2000(rgb_a: tuple[int, int, int], rgb_b: tuple[int, int, int]) -> float:
    """CIEDE2000 colour difference of two sRGB colours (0 = the same; ~2.3 = just noticeable; 100 = black/white)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    lab = rgb2lab(np.array([[rgb_a, rgb_b]], dtype=np.float64) / 255.0)[0]
    return float(deltaE_ciede2000(lab[0], lab[1]))


CONSECUTIVE_BONUS, CONTEXT_WINDOW = 0.1, 1  # Design2Code's context bonus for the final matching
MERGE_GAIN = 0.05  # a merge of two neighbouring blocks is kept when it improves the matching by more than this
MERGE_MAX_BLOCKS = 80  # above this on either page the merge search (cubic per trial) is skipped


class _Similarities:
    """Text similarity (difflib's ratio, as Design2Code's) of block texts, each pair computed once."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], float] = {}

    def ratio(self, x: TextBlock, y: TextBlock) -> float:
        key = (x.text, y.text)
        if key not in self.known:
            self.known[key] = difflib.SequenceMatcher(None, x.text, y.text).ratio()
        return self.known[key]

    def costs(self, a: list[TextBlock], b: list[TextBlock]) -> np.ndarray:
        return np.array([[-self.ratio(x, y) for y in b] for x in a]).reshape(len(a), len(b))


def _with_context(cost: np.ndarray, bonus: float, window: int) -> np.ndarray:
    """Design2Code's `adjust_cost_for_context`: a good pair gains from good pairs next to it (reading order)."""
    if window <= 0 or bonus == 0:
        return cost
    n, m = cost.shape
    adjusted = cost.copy()
    for i in range(n):
        for j in range(m):
            if cost[i, j] >= -0.5:
                continue
            nearby = np.sort(cost[max(0, i - window) : i + window + 1, max(0, j - window) : j + window + 1].ravel())
            nearby = np.delete(nearby[::-1], np.where(nearby[::-1] == cost[i, j])[0][0])
            adjusted[i, j] += bonus * nearby[-window * 2 :].sum()
    return adjusted


def _assignment(a, b, similarities: _Similarities, bonus: float = 0.0, window: int = 0):
    from scipy.optimize import linear_sum_assignment

    cost = _with_context(similarities.costs(a, b), bonus, window)
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows, cols)), cost[rows, cols].tolist()


def _merged(a: TextBlock, b: TextBlock) -> TextBlock:
    x0, y0 = min(a.x, b.x), min(a.y, b.y)
    x1, y1 = max(a.x + a.width, b.x + b.width), max(a.y + a.height, b.y + b.height)
    color = tuple((p + q) // 2 for p, q in zip(a.color, b.color))
    return TextBlock(f"{a.text} {b.text}", x0, y0, x1 - x0, y1 - y0, color)


def _gain(current: list[float], updated: list[float]) -> float:
    """Design2Code's `difference_of_means`: how much lower (better) the updated matching's costs are."""
    from collections import Counter

    left, right = Counter(current), Counter(updated)
    for value in set(current) & set(updated):
        common = min(left[value], right[value])
        left[value] -= common
        right[value] -= common
    only_current, only_updated = list(left.elements()), list(right.elements())
    mean_current = sum(only_current) / len(only_current) if only_current else 0
    mean_updated = sum(only_updated) / len(only_updated) if only_updated else 0
    if mean_current - mean_updated > 0 and only_current and only_updated and min(only_current) <= min(only_updated):
        return 0.0
    return mean_current - mean_updated


def _merge_listed(blocks: list[TextBlock], merges: list[tuple[int, int, float]]) -> list[TextBlock]:
    blocks, gone = list(blocks), []
    while merges:
        i, j, _ = merges.pop(0)
        blocks[i] = _merged(blocks[i], blocks[j])
        gone.append(j)
        merges = [m for m in merges if not {m[0], m[1]} & {i, j}]
    return [b for k, b in enumerate(blocks) if k not in gone]


def merge_consecutive_blocks(a: list[TextBlock], b: list[TextBlock], similarities: _Similarities | None = None):
    """Design2Code's `find_possible_merge`: merge neighbouring blocks of either page (a heading split over two lines,
    a sentence over two elements) while that makes the matching better by more than MERGE_GAIN."""
    similarities = similarities or _Similarities()
    while True:
        changed = False
        for side in (0, 1):
            blocks = a if side == 0 else b
            if len(blocks) < 2:
                continue
            _, current = _assignment(a, b, similarities)
            merges = []
            for i in range(len(blocks) - 1):
                trial = blocks[:i] + [_merged(blocks[i], blocks[i + 1])] + blocks[i + 2 :]
                _, updated = _assignment(*((trial, b) if side == 0 else (a, trial)), similarities)
                if (gain := _gain(current, updated)) > MERGE_GAIN:
                    merges.append((i, i + 1, gain))
            if merges:
                changed = True
                merged = _merge_listed(blocks, sorted(merges, key=lambda m: m[2], reverse=True))
                a, b = (merged, b) if side == 0 else (a, merged)
        if not changed:
            return a, b


def match_blocks(
    generated: list[TextBlock], reference: list[TextBlock], similarities: _Similarities | None = None
) -> list[tuple[int, int, float]]:
    """One-to-one pairs (generated index, reference index, text similarity) maximising total similarity with
    Design2Code's context bonus; pairs less alike than MATCH_THRESHOLD are dropped."""
    if not generated or not reference:
        return []
    similarities = similarities or _Similarities()
    pairs, _ = _assignment(generated, reference, similarities, CONSECUTIVE_BONUS, CONTEXT_WINDOW)
    scored = [(i, j, similarities.ratio(generated[i], reference[j])) for i, j in pairs]
    return [(i, j, s) for i, j, s in scored if s >= MATCH_THRESHOLD]


def layout_scores(generated: RenderedPage, reference: RenderedPage) -> dict[str, float]:
    """Design2Code-style block-match, text, position and colour scores of a generated page against its reference.

    As Design2Code computes them: neighbouring blocks merged where that improves the matching, matched with its
    context bonus, pairs under 0.5 text similarity dropped, and 0 on all four when either page has no text block.
    Where ours differs: blocks come from the rendered DOM (each element's own text, its box and computed colour),
    not from detecting text in a screenshot, so there is no merge of blocks sharing a box; the page is the whole
    scrollable document, not a screenshot's crop; pages of more than MERGE_MAX_BLOCKS blocks (long scraped pages)
    are matched without the merge search, whose cost grows with the fourth power of the blocks; the CLIP score is
    `clip_similarity`, apart."""
    gen, ref = generated.blocks, reference.blocks
    if not gen or not ref:
        return {"block_match": 0.0, "text_similarity": 0.0, "position_similarity": 0.0, "color_similarity": 0.0}
    similarities = _Similarities()
    if max(len(gen), len(ref)) <= MERGE_MAX_BLOCKS:
        gen, ref = merge_consecutive_blocks(gen, ref, similarities)
    pairs = match_blocks(gen, ref, similarities)
    if not pairs:
        return {"block_match": 0.0, "text_similarity": 0.0, "position_similarity": 0.0, "color_similarity": 0.0}
    total = sum(b.area for b in gen) + sum(b.area for b in ref)
    matched = sum(gen[i].area + ref[j].area for i, j, _ in pairs)
    positions = [
        1 - max(abs(gen[i].center[0] - ref[j].center[0]), abs(gen[i].center[1] - ref[j].center[1])) for i, j, _ in pairs
    ]
    colors = [max(0.0, 1 - ciede2000(gen[i].color, ref[j].color) / 100) for i, j, _ in pairs]
    return {
        "block_match": matched / total if total > 0 else 0.0,
        "text_similarity": float(np.mean([s for _, _, s in pairs])),
        "position_similarity": float(np.mean(positions)),
        "color_similarity": float(np.mean(colors)),
    }


# ---------------------------------------------------------------------------------------------- screenshots
def screenshot(
    page: str,
    out_png: str | Path,
    width: int = 800,
    height: int = 600,
    chromium: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Render `page` headless and save a PNG of the viewport. The page is shown the way the notebooks show it, in a
    sandboxed iframe (no scripts, no same origin) filling the window, and the browser has no network."""
    from .rendering import iframe_html

    out_png = Path(out_png).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        html_file = Path(tmp) / "page.html"
        html_file.write_text(
            "<!DOCTYPE html><html><head><style>html,body{margin:0;overflow:hidden}</style></head>"
            f"<body>{iframe_html(page, height, f'{width}px', style='border:0;display:block')}"
            "</body></html>",
            encoding="utf-8",
        )
        _run_chromium(
            [
                "--virtual-time-budget=2000",
                f"--window-size={width},{height}",
                f"--screenshot={out_png}",
                html_file.as_uri(),
            ],
            chromium,
            timeout,
        )
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


# ---------------------------------------------------------------------------------------------- CLIP
CLIP_MODEL = "openai/clip-vit-base-patch32"  # Design2Code's ViT-B/32
_NO_TEXT = "<style>*{color:transparent !important;text-shadow:none !important;caret-color:transparent}</style>"


def load_clip(model: str = CLIP_MODEL):
    """(CLIP model, image processor), or None and the reason. Weights load from a local folder or the local hub
    cache anywhere, and from the hub on Colab; nowhere else is a download attempted."""
    import sys

    import transformers
    from huggingface_hub import try_to_load_from_cache

    local_only = "google.colab" not in sys.modules and not Path(model).is_dir()
    missing = f"skipped: no CLIP weights for {model} here (a local folder, the hub cache or Colab loads them)"
    try:
        if local_only and not isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None, missing
    except ValueError:  # not a folder, nor a hub id
        return None, missing
    CLIPModel = transformers.CLIPModel
    # without torchvision, the PIL processor (the default one warns, then falls back to it)
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    try:
        return (
            CLIPModel.from_pretrained(model, local_files_only=local_only).eval(),
            CLIPImageProcessor.from_pretrained(model, local_files_only=local_only),
        ), None
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:160]
        return None, f"skipped: no CLIP weights for {model} here (a local folder or Colab loads them): {reason}"


def clip_similarity(generated: str, reference: str, clip, chromium: str | None = None) -> float:
    """Design2Code's CLIP score: cosine similarity of CLIP image embeddings of both pages' screenshots with their
    text taken out (Design2Code in-paints the text boxes; we render the text transparent, which shows exactly what
    lies behind it), so the score sees layout and colour, not words."""
    import torch
    from PIL import Image

    model, processor = clip
    with tempfile.TemporaryDirectory() as tmp:
        shots = [
            screenshot(_NO_TEXT + page, Path(tmp) / f"{name}.png", chromium=chromium)
            for name, page in (("a", generated), ("b", reference))
        ]
        images = [Image.open(path).convert("RGB") for path in shots]
        with torch.no_grad():
            features = model.get_image_features(**processor(images=images, return_tensors="pt"))
    if not isinstance(features, torch.Tensor):  # newer transformers return an output object
        features = features.pooler_output
    features = torch.nn.functional.normalize(features, dim=-1)
    return float((features[0] * features[1]).sum())
