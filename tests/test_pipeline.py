"""The whole chain, for real: papermill executes notebooks 01-05 on the tiny preset."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from htmlgen_utils.config import REPO_DIR, Config
from htmlgen_utils.pipeline import NOTEBOOKS, run_pipeline
from tests.browser import nonblank_fraction, pixels, require_chromium, screenshot_url

REQUIRED_METRICS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "html_valid_rate", "eval_loss")


def _outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            parts += [str(data.get("text/html", "")), str(data.get("text/plain", "")), str(output.get("text", ""))]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chain") / "tiny"
    metrics = run_pipeline(Config.from_preset("tiny", run_dir=str(run_dir)))
    return run_dir, metrics


def test_chain_runs_every_notebook_without_errors(chain):
    run_dir, metrics = chain
    for name in NOTEBOOKS:
        notebook = nbformat.read(str(run_dir / "executed" / f"{name}.ipynb"), as_version=4)
        errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert errors == [], name
    for artifact in ("data/train.jsonl", "data/test.jsonl", "packed/dataset_dict.json", "packing.png",
                     "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "htmlgen_config.json",
                     "history.json", "training.png", "metrics.json", "eval_table.json", "model_summary.json"):
        assert (run_dir / artifact).exists(), artifact
    assert set(REQUIRED_METRICS) <= set(metrics)
    assert metrics["eval_split"] == "test"


def test_fine_tuned_tiny_model_writes_pages_and_beats_its_base(chain):
    _, metrics = chain
    assert metrics["html_valid_rate"] > 0
    assert metrics["rougeL"] > metrics["base_model"]["rougeL"] + 0.1
    assert metrics["html_valid_rate"] > metrics["base_model"]["html_valid_rate"]


def test_gallery_is_in_notebook_05_outputs(chain):
    run_dir, _ = chain
    notebook = nbformat.read(str(run_dir / "executed" / "05_evaluation_and_rendering.ipynb"), as_version=4)
    text = _outputs_text(notebook)
    assert 'class="htmlgen-gallery"' in text and '<iframe sandbox=""' in text
    assert "fine-tuned" in text and "base model" in text  # the side-by-side comparison table


def test_notebook_05_html_export_shows_rendered_pages(chain, tmp_path):
    """nbconvert's HTML of the executed notebook 05 in headless Chromium, scrolled to the gallery: the pages render.
    Control: the same export with the iframes' srcdoc removed looks clearly different (blank frames)."""
    require_chromium()
    run_dir, _ = chain
    executed = run_dir / "executed" / "05_evaluation_and_rendering.ipynb"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(tmp_path), str(executed)],
                   check=True, capture_output=True)
    text = (tmp_path / "05_evaluation_and_rendering.html").read_text(encoding="utf-8")
    frames = re.findall(r"<iframe[^>]*>", text)
    assert len(frames) >= 4 and all('sandbox=""' in frame for frame in frames)
    # show only the gallery's cell, so the viewport holds the rendered pages
    text = text.replace("</head>", "<style>.jp-Cell:not(:has(#htmlgen-gallery)){display:none}</style></head>", 1)
    export, blanked = tmp_path / "gallery.html", tmp_path / "blanked.html"
    export.write_text(text, encoding="utf-8")
    blanked.write_text(text.replace("srcdoc=", "data-srcdoc="), encoding="utf-8")
    shown = screenshot_url(export.as_uri(), tmp_path / "gallery.png", 1280, 900)
    empty = screenshot_url(blanked.as_uri(), tmp_path / "blank.png", 1280, 900)
    assert nonblank_fraction(shown) > 0.05
    assert np.abs(pixels(shown) - pixels(empty)).mean() > 3.0  # the rendered pages are what differs
    if os.environ.get("HTMLGEN_SAVE_SCREENSHOT"):
        Path(os.environ["HTMLGEN_SAVE_SCREENSHOT"]).write_bytes(shown.read_bytes())


def test_pipeline_cli_names_the_failing_notebook(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"title": "x", "page": "y"}]))
    result = subprocess.run([sys.executable, "-m", "htmlgen_utils.pipeline", "--preset", "tiny", "--dataset", str(bad),
                             "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO_DIR,
                            timeout=300)
    assert result.returncode == 1
    assert "Notebook 01_dataset_exploration failed" in result.stderr and "no column(s)" in result.stderr


def test_merge_writes_a_16bit_model_equal_to_base_plus_adapter(chain):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from htmlgen_utils.export import merge_to_16bit

    run_dir, _ = chain
    merged_dir = merge_to_16bit(run_dir, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(Config.load(run_dir).model_id, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    ids = torch.randint(5, 500, (1, 32))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-3)
    assert (merged_dir / "tokenizer.json").exists()
