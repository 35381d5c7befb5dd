from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from htmlgen_utils.evaluation import (
    content_words,
    description_coverage,
    ends_with_html,
    html_problems,
    is_valid_html,
    is_well_formed,
    paired_gain,
    repetition,
    rouge,
    rouge_per_example,
    score_pages,
    spec_errors,
    tag_similarity,
    tree_bleu,
    tree_edit_similarity,
    visible_text,
)

VALID = [
    "<!DOCTYPE html><html><head><title>t</title></head><body><p>hi</p></body></html>",
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<style>p{color:red}</style>\n</head>\n'
    '<body>\n<main><h1>A</h1><img src="a.png" alt=""><br/><input type="text"></main>\n</body>\n</html>\n',
    "<!DOCTYPE html><html><head></head><body><!-- note --><script>if (a < b) { x = '</p>'; }</script>"
    "<table><tr><td>1</td></tr></table></body></html>",
]
BROKEN = {
    "unclosed tag": "<!DOCTYPE html><html><head></head><body><div><p>hi</p></body></html>",
    "truncated document": "<!DOCTYPE html><html><head></head><body><p>hi</p>",
    "stray text after html": "<!DOCTYPE html><html><head></head><body></body></html>trailing words",
    "stray text before body": "<!DOCTYPE html><html>loose<head></head><body></body></html>",
    "bad nesting": "<!DOCTYPE html><html><head></head><body><b><i>x</b></i></body></html>",
    "no doctype": "<html><head></head><body></body></html>",
    "end tag without start": "<!DOCTYPE html><html><head></head><body></span></body></html>",
    "void element closed": "<!DOCTYPE html><html><head></head><body><br></br></body></html>",
    "no head": "<!DOCTYPE html><html><body></body></html>",
    "empty": "",
    "fragment only": "<p>just a paragraph</p>",
}


@pytest.mark.parametrize("page", VALID)
def test_valid_pages_are_accepted(page):
    assert html_problems(page) == []


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_pages_are_rejected(name):
    assert not is_well_formed(BROKEN[name]), name
    assert html_problems(BROKEN[name])  # and we can say why


def test_rouge_equals_evaluate_rouge_per_page_and_its_mean():
    """Per page, our ROUGE is `evaluate`'s rouge (its own script, `tests/data/rouge/rouge.py`, from
    huggingface/evaluate, loaded offline) with `use_aggregator=False`; the aggregate is the mean of those, which
    evaluate's bootstrap median approaches but is not (module docstring)."""
    import evaluate

    predictions = ["the cat sat on the mat", "<p>Hello world</p>", "a b c d", "", "<ul><li>One</li><li>Two</li></ul>"]
    references = [
        "the cat is on the mat",
        "<div>hello there world</div>",
        "d c b a",
        "something",
        "<ol><li>two</li></ol>",
    ]
    predictions.append("<p>The runners were running</p>")  # a stemmer (evaluate's default has none) would match
    references.append("<p>A runner runs</p>")
    theirs = evaluate.load(str(Path(__file__).parent / "data" / "rouge")).compute(
        predictions=predictions, references=references, use_aggregator=False
    )
    ours = rouge_per_example(predictions, references)
    assert set(ours) == set(theirs) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
        assert rouge(predictions, references)[key] == pytest.approx(np.mean(theirs[key]), abs=1e-12)
    assert len({round(v, 6) for v in ours["rougeL"]}) >= 4  # the pages score differently: a real comparison
    aggregator = scoring.BootstrapAggregator()
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    for p, r in zip(predictions, references):
        aggregator.add_scores(scorer.score(r, p))
    assert aggregator.aggregate()["rouge1"].mid.fmeasure == pytest.approx(
        rouge(predictions, references)["rouge1"], abs=0.25
    )


def test_rouge_is_blind_to_markup_but_our_scores_are_not():
    reference = "<!DOCTYPE html><html><head></head><body><div><p>Hello</p></div></body></html>"
    mangled = "<!DOCTYPE html><html><head></head><body><div><p>Hello<p></div></body></html>"  # <p> for </p>
    assert rouge([mangled], [reference])["rougeL"] == 1.0
    assert is_well_formed(reference) and not is_well_formed(mangled)
    assert tag_similarity(mangled, reference) < 1.0
    assert tag_similarity(reference, reference) == 1.0


def test_visible_text_drops_tags_css_and_scripts():
    page = (
        "<html><head><style>p{color:red}</style></head>"
        "<body><h1>Title</h1><script>var x=1</script><p>Body</p></body></html>"
    )
    assert visible_text(page) == "Title Body"


def test_score_pages_table_and_summary(bundled_rows):
    refs = [r["html"] for r in bundled_rows[:3]]
    gens = [refs[0], refs[1][: len(refs[1]) // 2], "<p>nothing</p>"]
    table, summary = score_pages(["a", "b", "c"], gens, refs, layout=False)
    assert list(table["well_formed"]) == [True, False, False]
    assert list(table["valid_html"]) == [True, False, False]
    assert table.loc[0, "rougeL"] == pytest.approx(1.0) and table.loc[0, "tag_similarity"] == 1.0
    assert table.loc[0, "tree_bleu"] == 1.0 and table.loc[0, "tree_edit_similarity"] == 1.0
    assert summary["html_valid_rate"] == pytest.approx(1 / 3)
    assert 0 < summary["rougeL"] < 1 and summary["examples"] == 3
    assert summary["ends_with_html_rate"] == pytest.approx(1 / 3)


def test_layout_scores_are_skipped_with_the_reason_when_there_is_no_browser(monkeypatch):
    from htmlgen_utils import layout

    monkeypatch.setattr(layout, "find_chromium", lambda: None)
    table, summary = score_pages(["a"], [VALID[0]], [VALID[0]])
    assert summary["layout_scores"].startswith("skipped: No Chromium") and "block_match" not in table


# ---------------------------------------------------------------------------------------------- the HTML spec
SPEC_VALID = {
    "inline svg with self-closing paths": "<!DOCTYPE html><html><head><title>t</title></head><body><svg viewBox='0 0 9 "
    "9'><path d='M0 0L9 9'/><circle r='2'/></svg></body></html>",
    "tag-like text in title and textarea": "<!DOCTYPE html><html><head><title>a <b> c</title></head><body><textarea>"
    "<div>not a tag</textarea></body></html>",
    "optional end tags left out": "<!DOCTYPE html><html><head><title>t</title></head><body><p>one<p>two<ul><li>a<li>b"
    "</ul><table><tr><td>1<td>2</table>",
}


@pytest.mark.parametrize("name", sorted(SPEC_VALID))
def test_spec_valid_html_is_accepted(name):
    assert spec_errors(SPEC_VALID[name]) == [] and is_valid_html(SPEC_VALID[name])


@pytest.mark.parametrize(
    "name",
    [
        "unclosed tag",
        "stray text after html",
        "bad nesting",
        "no doctype",
        "end tag without start",
        "void element closed",
        "empty",
        "cut mid-element",
    ],
)
def test_spec_invalid_html_is_rejected(name):
    page = BROKEN.get(name, "<!DOCTYPE html><html><head></head><body><div><section><h1>Hi")
    assert not is_valid_html(page), name
    # a page cut after </p> is spec-valid (</body> and </html> may be left out), though not well-formed
    assert is_valid_html(BROKEN["truncated document"]) and not is_well_formed(BROKEN["truncated document"])


# ---------------------------------------------------------------------------------------------- structure
TREE = (
    "<!DOCTYPE html><html><head><title>t</title></head><body><ul><li>a</li><li>b</li></ul><div><p>x</p></div>"
    "</body></html>"
)


def test_tree_bleu_counts_the_reference_parent_children_patterns_found():
    # the reference's height-1 subtrees: html(head body), head(title), body(ul div), ul(li li), div(p)
    assert tree_bleu(TREE, TREE) == 1.0
    one_item = TREE.replace("<li>b</li>", "")
    assert tree_bleu(one_item, TREE) == pytest.approx(4 / 5)  # ul(li li) is missing
    assert tree_bleu(TREE.replace("<div><p>x</p></div>", "<section><p>x</p></section>"), TREE) == pytest.approx(3 / 5)
    assert tree_bleu(TREE, one_item) == pytest.approx(4 / 5)  # ul(li) is not ul(li li)


def test_tree_edit_similarity_is_one_minus_the_normalised_distance():
    assert tree_edit_similarity(TREE, TREE) == 1.0
    # 9 elements: html head title body ul li li div p; one li fewer is one deletion, over 8 + 9 elements
    assert tree_edit_similarity(TREE.replace("<li>b</li>", ""), TREE) == pytest.approx(1 - 1 / 17)
    assert tree_edit_similarity(
        TREE.replace("<div>", "<section>").replace("</div>", "</section>"), TREE
    ) == pytest.approx(1 - 1 / 18)  # one relabel
    assert tree_edit_similarity("<p>x</p>", TREE) < 0.8


def test_tree_edit_similarity_stays_within_zero_and_one():
    """A chain of 30 nested divs against 30 sibling spans costs more edits than the larger tree has elements (the
    old normalisation gave -0.79); over the two sizes together it stays in [0, 1]."""
    chain = "<div>" * 30 + "</div>" * 30
    siblings = "<span>x</span>" * 30
    assert 0.0 <= tree_edit_similarity(chain, siblings) <= 0.2
    assert tree_edit_similarity(siblings, chain) == tree_edit_similarity(chain, siblings)


def test_layout_scores_are_zero_when_either_page_has_no_text():
    """As Design2Code: no text blocks on either side scores 0 on all four (two blank pages scored 1.0 before)."""
    from htmlgen_utils.layout import RenderedPage, TextBlock, layout_scores

    blank, text = RenderedPage([], 0), RenderedPage([TextBlock("Hello", 0.1, 0.1, 0.2, 0.05, (0, 0, 0))], 1)
    for a, b in ((blank, blank), (blank, text), (text, blank)):
        assert set(layout_scores(a, b).values()) == {0.0}
    assert set(layout_scores(text, text).values()) == {1.0}


def test_layout_scores_merge_a_block_the_other_page_wrote_in_two():
    """A heading written as two elements (two blocks) against the same heading in one: Design2Code's merge of
    neighbouring blocks pairs them whole; without it each half matches poorly or not at all."""
    from htmlgen_utils.layout import RenderedPage, TextBlock, layout_scores, merge_consecutive_blocks

    black = (0, 0, 0)
    reference = RenderedPage(
        [
            TextBlock("Welcome to the Zephyr analytics dashboard", 0.1, 0.1, 0.6, 0.05, black),
            TextBlock("Sign in to see your numbers", 0.1, 0.2, 0.4, 0.03, black),
        ],
        2,
    )
    split = RenderedPage(
        [
            TextBlock("Welcome to the Zephyr", 0.1, 0.1, 0.3, 0.05, black),
            TextBlock("analytics dashboard", 0.4, 0.1, 0.3, 0.05, black),
            TextBlock("Sign in to see your numbers", 0.1, 0.2, 0.4, 0.03, black),
        ],
        3,
    )
    merged, _ = merge_consecutive_blocks(split.blocks, reference.blocks)
    assert [b.text for b in merged] == ["Welcome to the Zephyr analytics dashboard", "Sign in to see your numbers"]
    scores = layout_scores(split, reference)
    assert scores["text_similarity"] == pytest.approx(1.0) and scores["block_match"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- no reference needed
def test_description_coverage_counts_content_words_in_text_and_attributes():
    description = "Please create a dark pricing page for Zephyr with a signup form"
    assert content_words(description) == ["dark", "pricing", "zephyr", "signup", "form"]
    page = (
        "<!DOCTYPE html><html><head><title>Zephyr</title></head><body class='dark'><h1>Pricing</h1>"
        "<p style='color:form'>plans</p></body></html>"
    )
    assert description_coverage(description, page) == pytest.approx(3 / 5)  # zephyr, dark (class), pricing
    assert description_coverage("Create a page", page) == 1.0  # nothing to look for


def test_repetition_flags_a_generation_stuck_in_a_loop():
    normal = "\n".join(
        [
            "<!DOCTYPE html>",
            "<html>",
            "<body>",
            "<div class='card'>A</div>",
            "<div class='card'>B</div>",
            "</body>",
            "</html>",
        ]
    )
    stuck = "<!DOCTYPE html>\n<html><body>\n" + "<p>---------family---------</p>\n" * 40
    assert not repetition(normal)["runaway"] and repetition(normal)["repeated_line_share"] == 0
    loop = repetition(stuck)
    assert loop["runaway"] and loop["repeated_line_share"] > 0.9 and loop["repeated_4gram_share"] > 0.8
    assert ends_with_html(normal) and ends_with_html("<html></html>\n ") and not ends_with_html(stuck)


def minified_long_page(characters: int = 50_000) -> str:
    """Bundled long pages on one line, as scraped pages come: whitespace between tags gone, the rest collapsed."""
    import json
    import re

    from htmlgen_utils.config import REPO_DIR

    page = ""
    for line in (REPO_DIR / "data" / "long_pages.jsonl").read_text().splitlines():
        page += re.sub(r"\s+", " ", re.sub(r">\s+<", "><", json.loads(line)["html"])).strip()
        if len(page) >= characters:
            return page
    raise AssertionError("not enough long pages")


def test_runaway_sees_one_line_loops_and_spares_minified_pages():
    """A generation stuck on one line (`<a class="------...`) is a runaway, its 4-grams nearly all repeats; a real
    page minified onto one line (50k characters of repetitive cards and grids) is not, nor is a page that ends in
    a short run of one character. The line rule alone saw neither loop."""
    from htmlgen_utils.evaluation import ends_in_a_cycle

    stuck = repetition('<html><body><a class="' + "-" * 1000)
    assert stuck["runaway"] and stuck["repeated_4gram_share"] > 0.9 and stuck["repeated_line_share"] == 0
    assert repetition("<p>" + "ab" * 300)["runaway"]
    page = minified_long_page()
    assert "\n" not in page and len(page) >= 50_000
    real = repetition(page)
    assert not real["runaway"] and not ends_in_a_cycle(page), real
    assert not ends_in_a_cycle("<p>" + "x" * 200 + "</p></body></html>")


def test_paired_gain_is_the_mean_difference_and_its_interval_narrows_with_more_pages():
    """The gain is the mean of per-page differences; the bootstrap interval holds it, is seeded, has no width when
    every page gained the same, and is narrower over five times the pages (about 1/sqrt(5) as wide)."""
    tuned = [1.0, 0.8, 0.75, 1.0, 0.5, 1.0, 0.6, 0.8, 1.0, 0.75, 0.9, 0.7]
    base = [0.2, 0.8, 0.25, 0.5, 0.5, 0.0, 0.6, 0.4, 1.0, 0.25, 0.3, 0.7]
    twelve = paired_gain(tuned, base)
    assert twelve["gain"] == pytest.approx(np.mean(np.subtract(tuned, base)))
    assert twelve["low"] < twelve["gain"] < twelve["high"] and twelve["pages"] == 12
    assert paired_gain(tuned, base) == twelve
    sixty = paired_gain(tuned * 5, base * 5)
    assert sixty["gain"] == pytest.approx(twelve["gain"])
    ratio = (sixty["high"] - sixty["low"]) / (twelve["high"] - twelve["low"])
    assert 0.3 < ratio < 0.6
    assert paired_gain([1.0, 1.0], [0.5, 0.5]) == {"gain": 0.5, "low": 0.5, "high": 0.5, "confidence": 0.95, "pages": 2}
