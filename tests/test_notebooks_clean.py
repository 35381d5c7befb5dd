"""Notebooks are committed clean, with a literal `parameters` cell first, a Colab badge and setup cell."""

import ast

import nbformat
import pytest

from htmlgen_utils.config import REPO_DIR
from htmlgen_utils.pipeline import NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_parameterised(name):
    notebook = nbformat.read(str(REPO_DIR / "notebooks" / f"{name}.ipynb"), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
    assert "widgets" not in notebook.metadata
    assert "colab.research.google.com" in notebook.cells[0].source
    parameters = code[0]
    assert "parameters" in parameters.metadata.get("tags", [])
    for statement in ast.parse(parameters.source).body:
        assert isinstance(statement, ast.AnnAssign) and isinstance(statement.value, (ast.Constant, ast.Dict))
        assert ast.literal_eval(statement.value) is not None
    assert '"google.colab" in sys.modules' in code[1].source and "setup(" in code[1].source


# ---------------------------------------------------------------------------------------------- executed copies
MACHINE_PATHS = (str(REPO_DIR), "/tmp/", "/root/", "/home/", "site-packages/")


def _output_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(str(output.get("text", "")))
        parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
        parts += output.get("traceback", [])
    return "\n".join(parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_is_the_notebook_with_outputs(name):
    """`notebooks/executed/` (made by `python -m htmlgen_utils.pipeline --preset tiny --publish`): the same code
    cells as the notebook, in order (a notebook changed without publishing again fails here), with outputs, no
    errors, a first cell saying where the outputs come from, and no path of the machine that ran it."""
    source = nbformat.read(str(REPO_DIR / "notebooks" / f"{name}.ipynb"), as_version=4)
    executed = nbformat.read(str(REPO_DIR / "notebooks" / "executed" / f"{name}.ipynb"), as_version=4)
    code = [c.source for c in source.cells if c.cell_type == "code"]
    assert [c.source for c in executed.cells if c.cell_type == "code"] == code, (
        f"notebooks/executed/{name}.ipynb is stale: run python -m htmlgen_utils.pipeline --preset tiny --publish"
    )
    assert "tiny" in executed.cells[0].source and "--publish" in executed.cells[0].source
    ran = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran[1:]), "every cell after the parameters cell ran"
    assert not any(o.get("output_type") == "error" for c in ran for o in c.outputs)
    for cell in ran:
        text = _output_text(cell)
        assert not [p for p in MACHINE_PATHS if p in text], (name, [p for p in MACHINE_PATHS if p in text])


def test_executed_copies_show_the_loss_curve_and_the_gallery():
    def outputs(name):
        notebook = nbformat.read(str(REPO_DIR / "notebooks" / "executed" / f"{name}.ipynb"), as_version=4)
        return notebook.cells

    training = [c for c in outputs("04_training_loop") if "plot_training" in c.source][0]
    assert any("image/png" in o.get("data", {}) for o in training.outputs)
    step = [c for c in outputs("04_training_loop") if "scaler.unscale_(" in c.source][0]
    assert "step taken" in _output_text(step)
    gallery = [
        c
        for c in outputs("05_evaluation_and_rendering")
        if c.source.startswith("from htmlgen_utils.rendering import show_gallery")
    ]
    assert 'class="htmlgen-gallery"' in _output_text(gallery[0]) and '<iframe sandbox=""' in _output_text(gallery[0])
