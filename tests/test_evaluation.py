import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from htmlgen_utils.evaluation import (html_problems, is_well_formed, rouge, rouge_per_example, score_pages,
                                      tag_similarity, visible_text)

VALID = [
    "<!DOCTYPE html><html><head><title>t</title></head><body><p>hi</p></body></html>",
    "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<style>p{color:red}</style>\n</head>\n"
    "<body>\n<main><h1>A</h1><img src=\"a.png\" alt=\"\"><br/><input type=\"text\"></main>\n</body>\n</html>\n",
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


def test_rouge_equals_rouge_score_mean_fmeasure():
    predictions = ["the cat sat on the mat", "<p>Hello world</p>", "a b c d", ""]
    references = ["the cat is on the mat", "<div>hello there world</div>", "d c b a", "something"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    expected = {t: np.mean([scorer.score(r, p)[t].fmeasure for p, r in zip(predictions, references)])
                for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    ours = rouge(predictions, references)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12)
    # evaluate's default aggregate (bootstrap median) is close to, but not the same statistic as, the mean
    aggregator = scoring.BootstrapAggregator()
    for p, r in zip(predictions, references):
        aggregator.add_scores(scorer.score(r, p))
    assert aggregator.aggregate()["rouge1"].mid.fmeasure == pytest.approx(ours["rouge1"], abs=0.25)
    assert rouge_per_example(["a"], ["a"])["rougeL"] == [1.0]


def test_rouge_is_blind_to_markup_but_our_scores_are_not():
    reference = "<!DOCTYPE html><html><head></head><body><div><p>Hello</p></div></body></html>"
    mangled = "<!DOCTYPE html><html><head></head><body><div><p>Hello<p></div></body></html>"  # <p> for </p>
    assert rouge([mangled], [reference])["rougeL"] == 1.0
    assert is_well_formed(reference) and not is_well_formed(mangled)
    assert tag_similarity(mangled, reference) < 1.0
    assert tag_similarity(reference, reference) == 1.0


def test_visible_text_drops_tags_css_and_scripts():
    page = "<html><head><style>p{color:red}</style></head><body><h1>Title</h1><script>var x=1</script><p>Body</p></body></html>"
    assert visible_text(page) == "Title Body"


def test_score_pages_table_and_summary(bundled_rows):
    refs = [r["html"] for r in bundled_rows[:3]]
    gens = [refs[0], refs[1][: len(refs[1]) // 2], "<p>nothing</p>"]
    table, summary = score_pages(["a", "b", "c"], gens, refs)
    assert list(table["well_formed"]) == [True, False, False]
    assert table.loc[0, "rougeL"] == pytest.approx(1.0) and table.loc[0, "tag_similarity"] == 1.0
    assert summary["html_valid_rate"] == pytest.approx(1 / 3)
    assert 0 < summary["rougeL"] < 1 and summary["examples"] == 3
