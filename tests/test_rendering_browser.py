"""The sandboxed iframe, checked in a real headless Chromium."""

import html

import numpy as np

from htmlgen_utils.rendering import gallery_html, iframe_html, preview_document
from tests.browser import colour_fraction, dump_dom, nonblank_fraction, pixels, require_chromium, screenshot_url

HOST = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body data-host="1">{frame}
<script>window.addEventListener('load', () => {{
  document.body.setAttribute('data-escaped', document.querySelectorAll('#escaped').length);
  document.body.setAttribute('data-iframes', document.querySelectorAll('iframe').length);
}});</script></body></html>"""

EVIL = (
    '<!DOCTYPE html><html><head></head><body style="background:rgb(255,255,255)">'
    "<script>document.body.style.background = 'rgb(255,0,0)';"
    "try { parent.document.body.setAttribute('data-pwned', 'yes'); } catch (e) {}</script>"
    '"></iframe><div id="escaped" style="background:rgb(0,0,255);width:900px;height:900px"></div>'
    "<script>document.body.setAttribute('data-pwned', 'yes');</script>'</body></html>"
)


def _host(tmp_path, frame, name="host.html"):
    path = tmp_path / name
    path.write_text(HOST.format(frame=frame), encoding="utf-8")
    return path


def test_scripts_in_the_page_do_not_run_and_cannot_reach_the_notebook(tmp_path):
    require_chromium()
    host = _host(tmp_path, iframe_html(EVIL, height=200, width="300px"))
    dom = dump_dom(host.as_uri())
    assert 'data-iframes="1"' in dom and 'data-escaped="0"' in dom
    assert "data-pwned" not in dom.split("<iframe")[0] + dom.split("</iframe>")[-1]
    png = screenshot_url(host.as_uri(), tmp_path / "sandboxed.png", 600, 400)
    assert colour_fraction(png, (255, 0, 0)) == 0.0  # the page's own script did not run either
    blue = np.abs(pixels(png) - np.array([0, 0, 255])).sum(axis=2) < 40
    assert blue.any() and not blue[:, 320:].any() and not blue[220:, :].any()  # clipped to the 300x200 frame


def test_the_checks_would_catch_a_leak(tmp_path):
    """Positive controls: the same page with scripts allowed turns red and reaches the parent; unescaped it escapes."""
    require_chromium()
    allowed = iframe_html(EVIL, height=200, width="300px").replace(
        'sandbox=""', 'sandbox="allow-scripts allow-same-origin"'
    )
    dom = dump_dom(_host(tmp_path, allowed, "allowed.html").as_uri())
    assert 'data-pwned="yes"' in dom
    png = screenshot_url(_host(tmp_path, allowed, "allowed2.html").as_uri(), tmp_path / "allowed.png", 600, 400)
    assert colour_fraction(png, (255, 0, 0)) > 0.01
    unescaped = f'<iframe sandbox="" srcdoc="{EVIL}"></iframe>'
    dom = dump_dom(_host(tmp_path, unescaped, "unescaped.html").as_uri())
    assert 'data-escaped="1"' in dom


def test_quotes_and_closing_tags_stay_inside_srcdoc():
    page = "a \" b ' c </iframe> <script>x</script> &amp;"
    frame = iframe_html(page)
    assert frame.count("<iframe") == 1 and frame.count("</iframe>") == 1
    srcdoc = frame.split('srcdoc="', 1)[1].split('"', 1)[0]
    assert html.unescape(srcdoc) == preview_document(page) == '<base href="about:srcdoc">' + page
    assert 'sandbox=""' in frame and "allow-" not in frame


def test_gallery_renders_pages(tmp_path, bundled_rows):
    require_chromium()
    rows = [
        {"description": r["label"], "reference": r["html"], "generated": r["html"], "rougeL": 1.0, "well_formed": True}
        for r in bundled_rows[:2]
    ]
    page = tmp_path / "gallery.html"
    page.write_text("<!DOCTYPE html><html><body>" + gallery_html(rows, 300) + "</body></html>")
    empty = tmp_path / "empty.html"
    empty.write_text(page.read_text().replace("srcdoc=", "data-x="))
    with_pages = screenshot_url(page.as_uri(), tmp_path / "with.png", 1100, 700)
    without = screenshot_url(empty.as_uri(), tmp_path / "without.png", 1100, 700)
    assert nonblank_fraction(with_pages) > nonblank_fraction(without) + 0.02


def test_visual_similarity(bundled_rows):
    require_chromium()
    from htmlgen_utils.layout import visual_similarity

    dark = next(r["html"] for r in bundled_rows if r["scheme"] == "dark")
    light = next(r["html"] for r in bundled_rows if r["scheme"] == "gray")
    assert visual_similarity(light, light) == 1.0
    assert visual_similarity(dark, light) < 0.8


# ---------------------------------------------------------------------------------------------- layout scores
LAYOUT_PAGE = (
    "<!DOCTYPE html><html><head><title>Acme</title></head><body style='margin:0'>"
    "<h1 style='color:#1d4ed8'>Acme tools for makers</h1><p>Fast, simple and open.</p>"
    "<footer style='color:#444'>Contact us any time</footer>"
    "<script>document.body.innerHTML = '<h1>script ran</h1>'</script></body></html>"
)


def test_layout_scores_on_hand_made_pages():
    """Identical pages score the maximum; a moved block lowers position only; a changed colour lowers colour only;
    other words lower text and block-match; and the page's script never runs."""
    require_chromium()
    from htmlgen_utils.layout import layout_scores, render_pages

    moved = LAYOUT_PAGE.replace("<h1 style='color:#1d4ed8'>", "<h1 style='color:#1d4ed8;margin-left:500px'>")
    recoloured = LAYOUT_PAGE.replace("#1d4ed8", "#dc2626")
    reworded = LAYOUT_PAGE.replace("Acme tools for makers", "Nothing alike here at all")
    blank = "<!DOCTYPE html><html><head></head><body></body></html>"
    reference, *others = render_pages([LAYOUT_PAGE, moved, recoloured, reworded, blank])
    assert [b.text for b in reference.blocks] == [
        "Acme tools for makers",
        "Fast, simple and open.",
        "Contact us any time",
    ]  # no "script ran"
    same = layout_scores(reference, reference)
    assert same == {"block_match": 1.0, "text_similarity": 1.0, "position_similarity": 1.0, "color_similarity": 1.0}
    position = layout_scores(others[0], reference)
    assert position["position_similarity"] < 0.9 and {
        k: v for k, v in position.items() if k != "position_similarity"
    } == {"block_match": 1.0, "text_similarity": 1.0, "color_similarity": 1.0}
    colour = layout_scores(others[1], reference)
    assert colour["color_similarity"] < 0.9 and {k: v for k, v in colour.items() if k != "color_similarity"} == {
        "block_match": 1.0,
        "text_similarity": 1.0,
        "position_similarity": 1.0,
    }
    words = layout_scores(others[2], reference)
    assert words["block_match"] < 1.0 and words["text_similarity"] == 1.0  # the other blocks still match exactly
    assert reference.non_blank and not others[3].non_blank
    assert layout_scores(others[3], reference)["block_match"] == 0.0


def test_score_pages_adds_the_rendered_scores(bundled_rows):
    require_chromium()
    from htmlgen_utils.evaluation import score_pages

    refs = [r["html"] for r in bundled_rows[:2]]
    table, summary = score_pages(["a", "b"], [refs[0], "<!DOCTYPE html><html><body></body></html>"], refs)
    assert summary["layout_scores"] == "chromium"
    assert table.loc[0, "block_match"] == 1.0 and table.loc[1, "block_match"] == 0.0
    assert list(table["renders_non_blank"]) == [True, False] and summary["renders_non_blank_rate"] == 0.5
