"""notebooks/explore_run.ipynb executed end to end (nbclient, a real kernel) on a finished tiny run.

The run is the pipeline tests' shared workspace (the stages of ``pretrain`` on the tiny config); a Kedro project with
the ``test`` environment is laid around its ``data/`` folder, and the notebook finds it through ``EVA_PROJECT_PATH``
and ``KEDRO_ENV``, as a user's would find theirs. A fine-tuning table is supplied (``classification_metrics``) and
the video one is left absent, so both paths of the result cells run. Every number the notebook shows is checked
against the run's own files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from eva_pipeline.evaluation import explore

pytestmark = pytest.mark.slow  # the pre-training stages of the workspace, then a kernel: about a minute

CLASSIFICATION = {
    "target": "val",
    "sets": {
        "val": {"kind": "real", "images": 20, "scored_classes": 10, "in_average": True},
        "sketch": {"kind": "synthetic", "images": 20, "scored_classes": 10, "in_average": True},
    },
    "runs": {
        "student": {"val": {"top1": 0.55, "top5": 0.95}, "sketch": {"top1": 0.15, "top5": 0.5}},
        "random": {"val": {"top1": 0.3, "top5": 0.8}, "sketch": {"top1": 0.1, "top5": 0.45}},
    },
}


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _shown(cell: nbformat.NotebookNode, mime: str) -> list[str]:
    """What a cell displayed in one MIME type (Kedro's log lines are displays too, as HTML)."""
    return [o.data[mime] for o in cell.outputs if "data" in o and mime in o.data]


def _cell(notebook: nbformat.NotebookNode, source_start: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    return cell


@pytest.fixture(scope="module")
def executed(workspace, tmp_path_factory, pl, monkeypatch_module) -> dict:
    workspace.run("evaluation")  # ingestion .. evaluation: the `pretrain` pipeline's stages
    data = workspace.root / "data"
    project = pl.write_project(tmp_path_factory.mktemp("notebook") / "project")
    (project / "data").symlink_to(data)
    reports = project / "reports"
    reports.mkdir()
    (reports / "classification_metrics.json").write_text(json.dumps(CLASSIFICATION))
    overrides = {  # the fine-tuning tables: one there, one absent (video_metrics.json is never written)
        name: {"type": "json.JSONDataset", "filepath": str(reports / f"{name}.json")}
        for name in ("classification_metrics", "video_metrics")
    }
    (project / "conf" / "test" / "catalog.yml").write_text(yaml.safe_dump(overrides))
    monkeypatch_module.setenv("EVA_PROJECT_PATH", str(project))
    monkeypatch_module.setenv("KEDRO_ENV", "test")

    before = pl.file_listing(data)
    notebook = nbformat.read(pl.PROJECT_ROOT / "notebooks" / "explore_run.ipynb", as_version=4)
    where = {"metadata": {"path": str(pl.PROJECT_ROOT / "notebooks")}}  # the kernel starts where a user's does
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=where)
    client.execute()  # raises CellExecutionError, with the traceback, on any failing cell
    after = pl.file_listing(data)
    return {"notebook": notebook, "project": project, "data": data, "before": before, "after": after}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_notebook_loads_the_project_named_by_the_environment(executed) -> None:
    out = _stdout(executed["notebook"].cells[1])
    assert out.strip() == f"project {executed['project'].resolve()}, environment test"


def test_it_shows_the_masks_of_the_first_training_batch(executed, pl) -> None:
    cell = _cell(executed["notebook"], "STEP = 0")
    assert f"step 0: {pl.BATCH} images, " in _stdout(cell)
    masked = re.search(r"(\d+) to (\d+) patches masked each", _stdout(cell))
    assert 0 < int(masked[1]) <= int(masked[2]) <= 20  # num_masking_patches of the tiny config
    assert len(_shown(cell, "image/png")) == 1


def test_its_heldout_cosine_matches_the_runs_last_validation_loss(executed) -> None:
    cell = _cell(executed["notebook"], "if teacher_targets.validation is None")
    out = _stdout(cell)
    found = re.search(
        r"(\d+) held-out images: held-out loss (-?[\d.]+) \(last val_loss in the history: (-?[\d.]+)\)", out
    )
    assert found, out
    history = pd.read_csv(executed["data"] / "07_model_output" / "pretrain_history.csv")
    assert int(found[1]) == 40  # teacher_targets.validation.num_images of the tiny config
    assert float(found[3]) == pytest.approx(history["val_loss"].dropna().iloc[-1], abs=5e-5)
    assert float(found[2]) == pytest.approx(float(found[3]), abs=2e-3)  # the same loss, from the fp16 checkpoint
    assert len(_shown(cell, "image/png")) == 1


def test_it_plots_the_curves_and_tabulates_the_probe_and_finetuning(executed) -> None:
    notebook, data = executed["notebook"], executed["data"]
    assert len(_shown(_cell(notebook, 'explore.training_curves(catalog.load("pretrain_history"))'), "image/png")) == 1
    probe = json.loads((data / "08_reporting" / "probe_metrics.json").read_text())
    shown = _shown(_cell(notebook, 'explore.probe_table(catalog.load("probe_metrics"))'), "text/html")
    assert explore.probe_table(probe).round(4)._repr_html_() in shown
    shown = _shown(_cell(notebook, 'if catalog.exists("classification_metrics")'), "text/html")
    assert (100 * explore.classification_frame(CLASSIFICATION)).round(1)._repr_html_() in shown
    video = _stdout(_cell(notebook, 'if catalog.exists("video_metrics")'))
    assert video.startswith("video_metrics: not there")


def test_it_changes_none_of_the_runs_outputs(executed, pl) -> None:
    before, after = executed["before"], executed["after"]
    assert {path: after.get(path) for path in before} == before
    new = set(after) - set(before)
    assert all(Path(path).parts[1] == ".manifest_rows" for path in new), new  # the loader's row-index cache only
    assert not (pl.PROJECT_ROOT / "notebooks" / "mlflow.db").exists()  # it ran in the project, not the notebook dir
