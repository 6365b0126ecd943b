"""``kedro run --pipelines pretrain --env eva01`` on this machine: one message listing everything missing.

The real CLI in the real project folder: the paper's recipe needs Merged-30M, CLIP ViT-L/14 weights and 128 GPUs,
none of which a test machine has, so the preflight must stop the run before any node (no model is built) and
nothing may be written under data/ or into the MLflow store. data/ may hold outputs of earlier demo runs: the
test compares listings before and after.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

EVA01_DATA = (
    "data/01_raw/imagenet21k/train",
    "data/01_raw/ade20k/images/training",
    "data/01_raw/cc12m",
    "data/01_raw/cc3m",
    "data/01_raw/coco/train2017",
    "data/01_raw/objects365/train",
    "data/01_raw/imagenet1k/val",
)

# every test reads one whole `kedro run --env eva01` (its module fixture): `make test-fast` skips them
pytestmark = pytest.mark.slow


def _run_ids(store) -> set[str]:
    """Ids of the runs in the project's MLflow sqlite store (kedro-mlflow may create the empty store itself)."""
    if not store.exists():
        return set()
    with contextlib.closing(sqlite3.connect(store)) as db:
        try:
            return {row[0] for row in db.execute("SELECT run_uuid FROM runs")}
        except sqlite3.OperationalError:  # store created, schema not yet
            return set()


@pytest.fixture(scope="module")
def eva01_run(pl) -> dict:
    kedro = pl.PROJECT_ROOT / ".venv" / "bin" / "kedro"
    command = [str(kedro)] if kedro.exists() else [sys.executable, "-m", "kedro"]
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "1000",  # rich would wrap the message at 80 columns
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's mlflow.yml decides, as on a user's machine
    data, store = pl.PROJECT_ROOT / "data", pl.PROJECT_ROOT / "mlflow.db"
    data_before = pl.file_listing(data)
    runs_before = _run_ids(store)
    result = subprocess.run(
        [*command, "run", "--pipelines", "pretrain", "--env", "eva01"],
        cwd=pl.PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {
        "returncode": result.returncode,
        "output": result.stdout + result.stderr,
        "data_unchanged": pl.file_listing(data) == data_before,
        "no_new_run": _run_ids(store) == runs_before,
    }


def _message(run: dict) -> str:
    """The PreflightError text, whitespace-normalised."""
    output = run["output"]
    start = output.rfind("PreflightError: the run cannot start")
    assert start >= 0, output[-3000:]
    return " ".join(output[start:].split())


def test_stops_before_any_node_with_nothing_written(eva01_run):
    assert eva01_run["returncode"] != 0
    assert "Running node" not in eva01_run["output"]  # stopped in the preflight: no model, no teacher built
    assert eva01_run["data_unchanged"], "the refused run wrote under data/"
    assert eva01_run["no_new_run"], "the refused run opened an MLflow run"


def test_message_lists_every_missing_data_folder(eva01_run):
    message = _message(eva01_run)
    for path in EVA01_DATA:
        assert f"path {path} does not exist" in message, path


def test_message_says_the_clip_weights_are_missing_and_how_to_get_them(eva01_run):
    message = _message(eva01_run)
    assert "teacher_targets.teacher (open_clip)" in message
    assert "'ViT-L-14' / 'openai' are not on this machine and there is no network" in message
    assert "How to supply `ViT-L-14` / `openai` weights offline" in message


def test_message_names_the_gpu_requirements(eva01_run):
    message = _message(eva01_run)
    gpus = torch.cuda.device_count()
    assert f"pretrain.world_size is 128 (one process per GPU) but this machine has {gpus} GPU(s)" in message
    if not torch.cuda.is_available():
        assert "pretrain.device is 'cuda' but no CUDA GPU is visible" in message
        assert "pretrain.precision 'fp16' needs a CUDA GPU" in message
        assert "teacher_targets.device is 'cuda'" in message
