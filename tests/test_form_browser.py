"""The API's form page and a notebook preview, driven in headless Chromium as a person would: type, press Generate,
click inside the preview. Screenshots go to $HTMLGEN_SAVE_SCREENSHOTS when it is set."""

import json
import os
from pathlib import Path

import pytest

from htmlgen_utils.rendering import gallery_html
from tests.browser import require_chromium
from tests.net import free_port

expect = pytest.importorskip("playwright.sync_api").expect

DOT = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5E"
    "rkJggg=="
)
# What a generated page may hold: same-page and site links, a link out, a data: image, a script
PAGE = (
    "<!DOCTYPE html><html><head><title>Acme</title></head><body>"
    "<nav><a id='nav' href='#pricing'>Pricing</a> <a id='about' href='/about'>About</a> "
    "<a id='out' href='https://example.com/'>Elsewhere</a></nav><h1 id='top'>Acme</h1>"
    f"<img id='dot' src='{DOT}' width='40' height='40' alt='dot'>"
    "<div style='height:1500px'>features</div><section id='pricing'><h2>Pricing</h2></section>"
    "<script>document.body.dataset.ran = 'yes'</script></body></html>"
)


@pytest.fixture(scope="module")
def browser():
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        from htmlgen_utils.layout import CHROMIUM_FLAGS

        flags = [flag for flag in CHROMIUM_FLAGS if flag not in ("--headless", "--hide-scrollbars")]  # playwright's
        launched = playwright.chromium.launch(executable_path=chromium, args=flags)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def api(chain):
    from htmlgen_utils.serve import BackgroundServer, create_app
    from tests.models import adapted_tiny_model

    model, tokenizer = adapted_tiny_model(chain[0])  # the chain's fine-tuned model: it answers with pages
    server = BackgroundServer(
        create_app(
            model,
            tokenizer,
            max_new_tokens_cap=700,
            default_max_new_tokens=400,
        ),
        port=free_port(),
    )
    yield server
    server.stop()


def _save(page, name):
    folder = os.environ.get("HTMLGEN_SAVE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def _check_preview(frame_page, frame_locator):
    """The generated page's script did not run, its data: image shows, a site link does nothing, a same-page
    link scrolls inside the frame, a link out does not navigate the frame."""
    frame_locator.locator("#top").wait_for()
    frame = next((f for f in frame_page.frames if f.url.startswith("about:srcdoc")), None)
    assert frame is not None, [f.url for f in frame_page.frames]
    assert frame.evaluate("document.body.dataset.ran") is None  # scripts stay off
    assert frame.evaluate("document.getElementById('dot').naturalWidth") == 1  # the data: image loaded
    for link in ("#about", "#out"):
        frame_locator.locator(link).click()
        frame_page.wait_for_timeout(300)
        assert frame.url == "about:srcdoc" and frame.evaluate("document.title") == "Acme", link
    frame_locator.locator("#nav").click()
    frame_page.wait_for_timeout(300)
    assert frame.url == "about:srcdoc#pricing" and frame.evaluate("window.scrollY") > 500
    assert frame.evaluate("document.getElementById('prompt')") is None  # never our own app inside the frame


def test_form_generates_with_the_real_model(browser, api):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(f"{api.url}/")
    assert (
        page.evaluate("window.innerWidth") == 390 and page.evaluate("document.documentElement.scrollWidth") <= 400
    )  # the viewport meta: no 980 px layout
    assert page.get_by_label("Page description").is_visible()
    page.get_by_label("Page description").fill("A retro 404 error page for Nova")
    page.get_by_role("button", name="Generate").click()
    assert page.get_by_role("button", name="Generate").is_disabled()  # one generation at a time
    expect(page.locator("#status")).to_contain_text("tokens in", timeout=120_000)
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    assert page.locator("#source").text_content().strip().startswith("<")  # the page it wrote
    _save(page, "form_phone.png")
    icon = page.request.get(f"{api.url}/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg")


def test_form_preview_keeps_links_inside_and_shows_what_the_page_shows(browser, api):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    requests_seen = []

    def answer(route):
        requests_seen.append(route.request.post_data)
        route.fulfill(
            status=200, content_type="application/json", body=json.dumps({"html": PAGE, "tokens": 99, "seconds": 0.1})
        )

    page.route("**/query", answer)
    page.goto(f"{api.url}/")
    prompt = page.get_by_label("Page description")
    prompt.fill("A landing page for Acme")
    prompt.press("Enter")  # Enter submits
    expect(page.locator("#status")).to_contain_text("99 tokens")
    assert len(requests_seen) == 1 and json.loads(requests_seen[0])["user_prompt"] == "A landing page for Acme"
    _check_preview(page, page.frame_locator("#preview"))
    _save(page, "form_preview.png")


def test_form_errors_read_as_errors_and_clear_the_old_page(browser, api):
    page = browser.new_page()
    page.goto(f"{api.url}/")
    page.get_by_label("Page description").fill("A login page for Orbit")
    page.route(
        "**/query",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps({"html": PAGE, "tokens": 1, "seconds": 0.1})
        ),
    )
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("tokens in")
    page.unroute("**/query")
    page.get_by_label("Page description").fill("   ")
    page.get_by_role("button", name="Generate").click()
    assert page.locator("#status").get_attribute("class") == "error"
    assert "Describe the page" in page.locator("#status").text_content()
    # an error from the server itself (a whitespace-only prompt sent directly is refused the same way)
    page.get_by_label("Page description").fill("x" * 2500)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text("Could not generate")
    message = page.locator("#status").text_content()
    assert "Describe the page you want" in message and "String should" not in message
    assert page.locator("#preview").get_attribute("srcdoc") == ""  # the previous page is gone
    _save(page, "form_error.png")


def test_notebook_gallery_preview_keeps_links_inside(browser, tmp_path):
    rows = [{"description": "A landing page for Acme", "reference": PAGE, "generated": PAGE, "rougeL": 1.0}]
    host = tmp_path / "notebook.html"
    host.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><div id='notebook'>notebook</div>"
        + gallery_html(rows, 400)
        + "</body></html>",
        encoding="utf-8",
    )
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(host.as_uri())
    _check_preview(page, page.frame_locator("iframe").first)
    _save(page, "notebook_preview.png")
