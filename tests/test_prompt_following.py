"""prompt_following.py: each attribute check holds on the bundled reference pages and fails on a page without
that attribute; a model that writes one page for every prompt is flagged; CLIP is skipped cleanly without weights."""

import json
import re

import pytest

from htmlgen_utils.config import BUNDLED_DATA_FILE
from htmlgen_utils.prompt_following import (
    distinct_pages,
    follows_description,
    mean_pairwise_similarity,
    page_kind,
    requested_attributes,
    sameness_warning,
)
from tests.browser import require_chromium


@pytest.fixture(scope="module")
def rows():
    with open(BUNDLED_DATA_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_every_bundled_page_is_recognised_as_its_own_kind(rows):
    assert [page_kind(r["html"]) for r in rows] == [r["kind"] for r in rows]


def test_each_check_holds_on_references_and_fails_without_its_attribute(rows):
    from htmlgen_utils.dataset_generator import SCHEMES
    from htmlgen_utils.layout import render_pages

    require_chromium()
    picked = [next(r for r in rows if r["kind"] == kind and r["components"]) for kind in ("login", "pricing", "404")]
    picked += [next(r for r in rows if set(r["components"]) == {c, d}) for c, d in (("navbar", "testimonials"),)]
    picked += [next(r for r in rows if set(r["components"]) >= {c}) for c in ("download", "faq", "newsletter")]
    picked += [next(r for r in rows if r["scheme"] == scheme and scheme in r["label"].lower()) for scheme in SCHEMES]
    attributes = requested_attributes([r["label"] for r in picked])
    assert attributes is not None
    broken = []
    for row, asked in zip(picked, attributes):
        page = row["html"]
        other_scheme = next(s for s in SCHEMES if s not in (row["scheme"], "gray" if row["scheme"] != "gray" else ""))
        bg, text, accent, surface = SCHEMES[other_scheme]
        recoloured = re.sub(
            r":root\{[^}]*\}", f":root{{--bg:{bg};--text:{text};--accent:{accent};--surface:{surface}}}", page
        )
        donor = next(r for r in rows if r["kind"] != row["kind"])  # another kind's main content in this page
        main = re.search(r"<main>.*?</main>", donor["html"], flags=re.DOTALL).group(0)
        kindless = re.sub(r"<main>.*?</main>", lambda _: main, page, flags=re.DOTALL)
        broken.append(
            {
                "brand": page.replace(row["brand"], "Acme"),
                "kind": kindless,
                "scheme": recoloured,
                **{
                    f"component:{c}": {
                        "navbar": re.sub(r"<nav>.*?</nav>", "", page, flags=re.DOTALL),
                        "footer": re.sub(r"<footer>.*?</footer>", "", page, flags=re.DOTALL),
                        "testimonials": re.sub(
                            r"<section>\n<h2>What people say.*?</section>", "", page, flags=re.DOTALL
                        ),
                        "download": re.sub(r'<a class="button" href="#download">.*?</a>', "", page),
                        "faq": re.sub(r"<section>\n<h2>FAQ.*?</section>", "", page, flags=re.DOTALL),
                        "newsletter": re.sub(r"<section>\n<h2>Newsletter.*?</section>", "", page, flags=re.DOTALL),
                    }[c]
                    for c in row["components"]
                },
            }
        )
    for asked, variants in zip(attributes, broken):
        if asked["scheme"] is None:  # the description names no colour: none is checked
            del variants["scheme"]
    pages = [r["html"] for r in picked] + [p for b in broken for p in b.values()]
    rendered = iter(render_pages(pages))
    for row, asked in zip(picked, attributes):
        result = follows_description(asked, row["html"], next(rendered))
        assert result["overall"] == 1.0, (row["label"], result)
    for row, asked, variants in zip(picked, attributes, broken):
        for check, page in variants.items():
            result = follows_description(asked, page, next(rendered))
            assert result[check] is False, (row["label"], check, result)
            assert result["overall"] < 1.0


def test_one_page_for_every_prompt_is_flagged(rows):
    references = [r["html"] for r in rows[:12]]
    same = [references[0]] * 11 + [references[1]]
    assert distinct_pages(same) == pytest.approx(1 / 12) and distinct_pages(references) == 1.0
    assert mean_pairwise_similarity(same) > 0.8 > mean_pairwise_similarity(references)
    warning = sameness_warning(same, references)
    assert warning is not None and "ignores its prompts" in warning and "8%" in warning
    assert sameness_warning(references, references) is None
    assert distinct_pages([" <p>a</p>\n", "<p>a</p>"]) == 0.0  # the same page, whitespace aside


def test_a_colour_the_description_does_not_name_is_not_asked_for(rows):
    """The generator records every page's scheme, but "A retro 404 error page for Kite" asks for no colour: its
    page is not marked down for the one it has."""
    named = next(r for r in rows if r["scheme"] in r["label"].lower())
    unnamed = next(r for r in rows if not any(s in r["label"].lower() for s in ("dark", r["scheme"])))
    asked_named, asked_unnamed = requested_attributes([named["label"], unnamed["label"]])
    assert asked_named["scheme"] == named["scheme"] and asked_unnamed["scheme"] is None
    assert asked_unnamed["brand"] == unnamed["brand"] and asked_unnamed["kind"] == unnamed["kind"]
    result = follows_description(asked_unnamed, unnamed["html"], rendered=object())  # no colour read at all
    assert result["scheme"] is None and result["overall"] == 1.0


def test_descriptions_without_attributes_get_none():
    assert requested_attributes(["a page about cats"]) is None


def test_clip_is_skipped_with_the_reason_without_weights(tmp_path):
    from htmlgen_utils.layout import load_clip

    clip, reason = load_clip(str(tmp_path / "no-such-model"))
    assert clip is None and reason.startswith("skipped: no CLIP weights")
    clip, reason = load_clip()  # the hub id, offline: not downloaded here
    assert clip is None and "openai/clip-vit-base-patch32" in reason


def test_clip_similarity_runs_on_text_free_screenshots(tmp_path, rows):
    """A tiny random CLIP saved locally goes through the whole path: identical pages score 1, the text alone
    changes nothing (it is taken out), another layout scores less."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from htmlgen_utils.layout import clip_similarity, load_clip

    require_chromium()
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    clip, reason = load_clip(str(tmp_path / "clip"))
    assert reason is None
    light = next(r for r in rows if r["scheme"] == "orange")
    page = light["html"]
    same = clip_similarity(page, page, clip)
    renamed = clip_similarity(page.replace(light["brand"], "Somebody Else Entirely"), page, clip)
    dark = next(r["html"] for r in rows if r["scheme"] == "dark" and r["kind"] != light["kind"])
    other = clip_similarity(dark, page, clip)
    # two renders of one page may differ by a pixel or two: "the same" is within 1e-3
    assert same > 0.999 and renamed > 0.999 and other < min(same, renamed) - 1e-3, (same, renamed, other)
