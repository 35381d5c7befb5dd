"""Stage 5c: show pages to a person, safely.

Generated HTML is untrusted: a model can write `<script>`, forms, or markup meant to break out of its
container. Every page is shown inside `<iframe sandbox srcdoc="...">` with an *empty* sandbox (no
`allow-scripts`, no `allow-same-origin`, no forms, no popups, no top navigation), and the page text is
HTML-escaped (`&`, `<`, `>`, `"` and `'`) before it goes into the attribute, so a `"` or `</iframe>` in
the page stays text inside srcdoc. The source/preview toggle is a plain `<details>` element: no script
needed, so it works in Jupyter, Colab, and nbconvert's HTML export.
"""

from __future__ import annotations

import html
import re
from typing import Iterable

IFRAME_STYLE = "border:1px solid #ccc;border-radius:4px;background:#fff"


PREVIEW_BASE = '<base href="about:srcdoc">'
# an <a> or <area> whose href is not a same-page "#anchor"
_OUTWARD_LINK = re.compile(r"<(a|area)(?=\s)(?=[^>]*?\shref\s*=\s*(?![\"']?#))", re.IGNORECASE)


def preview_document(page: str) -> str:
    """`page` as a preview shows it: links stay inside the preview.

    A srcdoc frame resolves links against its parent's address, so in a plain preview `href="#pricing"` loads the
    notebook (or the API's form page) inside the frame. `<base href="about:srcdoc">` first in the head makes
    same-page anchors scroll inside the preview, and every other link gets `target="_blank"`, which the sandbox
    (no popups) turns into nothing: no broken or borrowed frame. The form page's JavaScript does the same."""
    head = re.search(r"<head\b[^>]*>", page, re.IGNORECASE)
    doctype = re.search(r"<!doctype[^>]*>", page, re.IGNORECASE)
    at = head.end() if head else doctype.end() if doctype else 0
    page = page[:at] + PREVIEW_BASE + page[at:]
    return _OUTWARD_LINK.sub(lambda m: f'<{m.group(1)} target="_blank"', page)


def iframe_html(
    page: str, height: int = 360, width: str = "100%", title: str = "generated page", style: str = IFRAME_STYLE
) -> str:
    """A fully sandboxed iframe holding `page` (escaped into srcdoc, links kept inside: `preview_document`)."""
    return (
        f'<iframe sandbox="" referrerpolicy="no-referrer" title="{html.escape(title)}" '
        f'srcdoc="{html.escape(preview_document(page), quote=True)}" style="width:{width};height:{height}px;'
        f'{style}"></iframe>'
    )


def source_toggle(page: str, label: str = "source") -> str:
    return (
        f'<details><summary>{html.escape(label)}</summary><pre style="max-height:240px;overflow:auto;'
        f'white-space:pre-wrap;font-size:11px">{html.escape(page)}</pre></details>'
    )


def page_card(page: str, heading: str = "", height: int = 360) -> str:
    return (
        f"<div>{f'<b>{html.escape(heading)}</b>' if heading else ''}"
        f"{iframe_html(page, height, title=heading or 'page')}"
        f"{source_toggle(page)}</div>"
    )


def show_page(page: str, height: int = 360):
    """Display one page inline in a notebook (sandboxed)."""
    from IPython.display import HTML, display

    display(HTML(page_card(page, height=height)))


def gallery_html(
    rows: Iterable[dict],
    height: int = 320,
    score_keys: tuple[str, ...] = ("rougeL", "tree_bleu", "description_coverage", "block_match", "valid_html"),
    element_id: str = "htmlgen-gallery",
) -> str:
    """Reference vs generated (and the base model's page, when a row has `base_generated`), side by side, one row
    per example with its scores."""
    parts = [f'<div class="htmlgen-gallery" id="{html.escape(element_id)}">']
    for index, row in enumerate(rows):
        scores = ", ".join(
            f"{k} {row[k]:.2f}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
            for k in score_keys
            if k in row
        )
        parts.append(
            f'<div style="margin:12px 0;padding:8px;border-top:2px solid #888">'
            f"<p><b>{index + 1}. {html.escape(str(row['description']))}</b><br><small>{html.escape(scores)}</small></p>"
            f'<div style="display:flex;gap:12px">'
            f'<div style="flex:1">{page_card(row["reference"], "reference", height)}</div>'
            f'<div style="flex:1">{page_card(row["generated"], "fine-tuned", height)}</div>'
            + (
                f'<div style="flex:1">{page_card(row["base_generated"], "base model", height)}</div>'
                if "base_generated" in row
                else ""
            )
            + "</div></div>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def show_gallery(table, limit: int = 6, height: int = 320, base_table=None):
    """Display the first `limit` rows of a per-example score table as a side-by-side gallery (with the base
    model's page beside the fine-tuned one when `base_table` is given)."""
    from IPython.display import HTML, display

    rows = table.head(limit).to_dict("records") if hasattr(table, "head") else list(table)[:limit]
    if base_table is not None:
        for row, base_page in zip(rows, list(base_table["generated"])):
            row["base_generated"] = base_page
    display(HTML(gallery_html(rows, height)))


def playground(
    model,
    tokenizer,
    max_new_tokens: int = 1024,
    default: str = "A minimalist landing page with a download button",
    compile_decode: bool = False,
):
    """An ipywidgets playground: type a description, press Generate, see the page (streamed source, then the
    sandboxed preview). Works in Jupyter and Colab; returns the widget box."""
    import ipywidgets as widgets

    from .generation import clean_page, stream_page

    text = widgets.Textarea(value=default, placeholder="Describe a page…", layout=widgets.Layout(width="100%"))
    tokens = widgets.IntSlider(
        value=max_new_tokens, min=32, max=max(max_new_tokens, 2048), step=32, description="max tokens"
    )
    sample = widgets.Checkbox(value=False, description="sample (temperature 0.7)")
    button = widgets.Button(description="Generate", button_style="primary", icon="play")
    status = widgets.Label()
    preview = widgets.HTML()

    def on_click(_):
        button.disabled = True
        status.value = "generating…"
        page = ""
        try:
            pieces = stream_page(
                model, tokenizer, text.value, tokens.value, sample.value, compile_decode=compile_decode
            )
            for count, piece in enumerate(pieces, 1):
                page += piece
                if count % 16 == 0:
                    preview.value = f"<pre style='white-space:pre-wrap;font-size:11px'>{html.escape(page)}</pre>"
            page = clean_page(page)
            preview.value = page_card(page, height=480)
            status.value = f"{len(page)} characters"
        except Exception as error:  # keep the widget alive and say what happened
            status.value = f"error: {error}"
        finally:
            button.disabled = False

    button.on_click(on_click)
    return widgets.VBox([text, widgets.HBox([button, tokens, sample]), status, preview])
