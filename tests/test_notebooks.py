"""The notebooks under notebooks/ are committed as code only: no outputs, no execution counts, nothing nbstripout
would strip (``make format`` strips them, ``make lint`` checks). tests/pipelines/test_notebook.py executes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_project_has_its_exploration_notebook() -> None:
    assert "explore_run.ipynb" in [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    for number, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {number} has outputs (run `make format`)"
        assert cell.execution_count is None, f"{path.name}: code cell {number} has an execution count"
    verify = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, f"nbstripout would strip {path.name}: {verify.stdout}{verify.stderr}"
