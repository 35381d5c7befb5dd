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
