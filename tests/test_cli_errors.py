"""A user's mistake at any entry point: one line naming the problem and the fix, a non-zero exit, no traceback.

Each case runs the real entry point as `python -m` would (`runpy`, as `__main__`, with its own argv), in this
process to save each case a Python start: an exception that escaped the one-line handler would fail the test
here as the traceback would show there. The working directory is a fresh folder, so the default run directory
(`runs/<preset>`) is never a user's own."""

import json
import runpy
import sys

import pytest

from htmlgen_utils.config import REPO_DIR

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs a module

GOOD_ROW = {"label": "A page", "html": "<!DOCTYPE html><html><head></head><body><p>hi</p></body></html>"}


def rows_file(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


# (id, how to build the command from tmp_path, expected exit code, words the message must hold)
CASES = [
    (
        "mistyped columns",
        lambda t: ["train", "--dataset", rows_file(t, "a.jsonl", jsonl([{"title": "x", "page": "y"}]))],
        2,
        ["no column(s) ['label', 'html']", "label_column"],
    ),
    (
        "not utf-8",
        lambda t: [
            "train",
            "--dataset",
            rows_file(t, "a.jsonl", jsonl([GOOD_ROW]).replace("A page", "Caf\xe9").encode("latin-1")),
        ],
        2,
        ["is not utf-8 text", "byte 0xe9 on line 1", "dataset_encoding"],
    ),
    ("empty file", lambda t: ["train", "--dataset", rows_file(t, "a.jsonl", "")], 2, ["is empty"]),
    (
        "object not list",
        lambda t: ["train", "--dataset", rows_file(t, "a.json", json.dumps({"rows": [GOOD_ROW]}))],
        2,
        ["holds a JSON object", "expected a list", "'rows'"],
    ),
    (
        "broken jsonl line",
        lambda t: ["train", "--dataset", rows_file(t, "a.jsonl", jsonl([GOOD_ROW] * 2) + "{oops\n")],
        2,
        ["line 3", "not a JSON object"],
    ),
    (
        "page not text",
        lambda t: ["train", "--dataset", rows_file(t, "a.json", json.dumps([GOOD_ROW, {"label": "b", "html": 42}]))],
        2,
        ["column 'html' holds int", "expected text"],
    ),
    (
        "too few rows",
        lambda t: [
            "train",
            "--dataset",
            rows_file(
                t,
                "a.jsonl",
                jsonl([GOOD_ROW, GOOD_ROW, {"label": "", "html": "x"}, {"label": "b", "html": "<p>b</p>"}]),
            ),
        ],
        2,
        ["4 rows, 1 empty, 1 duplicates and 1 that cannot teach a page dropped, 1 left", "at least 3"],
    ),
    ("missing dataset", lambda t: ["train", "--dataset", str(t / "nope.jsonl")], 2, ["does not exist"]),
    (
        "hub without network",
        lambda t: ["train", "--dataset", "someone/html-pages"],
        2,
        ["Could not load dataset 'someone/html-pages'", "network"],
    ),
    ("unknown preset", lambda t: ["train", "--preset", "t4"], 2, ["Unknown preset 't4'", "colab-t4"]),
    ("unknown field", lambda t: ["train", "-p", "max_step", "3"], 2, ["Unknown Config field(s) ['max_step']"]),
    ("bad value", lambda t: ["train", "-p", "learning_rate", "5"], 2, ["Config.learning_rate=5", "below 1"]),
    ("run dir is a file", lambda t: ["train", "--run-dir", rows_file(t, "run", "x")], 2, ["run_dir", "is a file"]),
    ("serve without adapter", lambda t: ["serve", "--run-dir", str(t)], 2, ["No trained adapter", "04_training_loop"]),
    (
        "notebook 05 without adapter",
        lambda t: ["pipeline", "--notebooks", "05", "--run-dir", str(t / "run")],
        1,
        ["Notebook 05_evaluation_and_rendering failed", "run notebook 04_training_loop first"],
    ),
    ("unknown notebook", lambda t: ["pipeline", "--notebooks", "6"], 2, ["no notebook starts with ['6']"]),
    (
        "client, no server",
        lambda t: ["test.py", "--api_url", "http://127.0.0.1:9/query", "--user_prompt", "x"],
        3,
        ["could not connect", "htmlgen_utils.serve"],
    ),
    (
        "client, bad url",
        lambda t: ["test.py", "--api_url", "localhost:8888/query", "--user_prompt", "x"],
        2,
        ["--api_url", "http://"],
    ),
]


@pytest.mark.parametrize("name, command, code, words", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_gets_one_line_and_no_traceback(tmp_path, monkeypatch, capfd, name, command, code, words):
    args = command(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [args[0], *args[1:]])
    with pytest.raises(SystemExit) as exit_info:
        if args[0].endswith(".py"):
            runpy.run_path(str(REPO_DIR / args[0]), run_name="__main__")
        else:
            runpy.run_module(f"htmlgen_utils.{args[0]}", run_name="__main__")
    out, err = capfd.readouterr()
    assert exit_info.value.code == code, (out + err)[-2000:]
    assert "Traceback" not in out + err
    message = [line for line in err.splitlines() if line.startswith(("error:", "FAILED:"))]
    assert len(message) == 1, err[-2000:]
    for word in words:
        assert word.lower() in message[0].lower(), (word, message[0])
