"""A training killed with SIGKILL and started again, as a user would (``kedro run`` twice), read back from the
MLflow store through MLflow's client: the attempts are linked, the dead one is not left RUNNING, and the run that
finishes holds every step once, none of the discarded work; its student is a registered MLflow model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from eva_pipeline import tracking
from eva_pipeline.datasets import StudentConfigDataset
from eva_pipeline.models import EvaMIM, load_official_checkpoint
from eva_pipeline.pipelines.common import student_config
from eva_pipeline.runtime.launch import RENDEZVOUS_ENV
from eva_pipeline.training import checkpointing

pytestmark = pytest.mark.slow  # three kedro processes, one killed mid-training

STEPS, EVERY = 64, 4  # 8 epochs of the tiny config's 256 images in batches of 32, a checkpoint every 4 steps


def _kedro(root: Path, pipelines: str, log: Path) -> subprocess.Popen:
    # not the test process's rendezvous either: an earlier test's engine still listens on its MASTER_PORT
    dropped = {"MLFLOW_TRACKING_URI", "DVC_STAGE", *RENDEZVOUS_ENV}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(KEDRO_DISABLE_TELEMETRY="1", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "kedro", "run", "--env", "test", "--pipelines", pipelines]
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, pl) -> dict:
    root = pl.write_project(
        tmp_path_factory.mktemp("restart") / "project",
        extra_params={"pretrain": {"max_steps": STEPS, "checkpoint": {"every_steps": EVERY, "keep_last": 2}}},
    )
    log = root / "kedro.log"
    _finish(_kedro(root, "ingestion,student_config,teacher_targets", log), log)

    proc = _kedro(root, "train_student", log)
    checkpoints = root / "data" / "06_models" / "checkpoints"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # the first complete checkpoint: training runs
        if any(checkpointing.tags(folder) for folder in checkpoints.glob("*") if folder.name != "launch"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the training ended before it could be killed:\n" + log.read_text()[-4000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    _finish(_kedro(root, "train_student", log), log)  # the same command again: resumes from the checkpoint
    return {"root": root, "client": MlflowClient(f"sqlite:///{root / 'mlflow.db'}")}


def _attempts(client: MlflowClient) -> tuple[object, list]:
    """The experiment and its runs of the pre-training, oldest first."""
    (experiment,) = [e for e in client.search_experiments() if e.name == "eva_pipeline"]
    tag = f"{tracking.TRAINING_TAG}pretrain"
    runs = [r for r in client.search_runs([experiment.experiment_id]) if tag in r.data.tags]
    return experiment, sorted(runs, key=lambda r: r.info.start_time)


def test_the_attempts_of_one_training_are_linked_and_the_dead_one_is_closed(restarted):
    client = restarted["client"]
    experiment, attempts = _attempts(client)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_DEVELOPMENT
    assert len(attempts) == 2
    (training_id,) = {r.data.tags[f"{tracking.TRAINING_TAG}pretrain"] for r in attempts}
    killed, finished = tracking.training_runs(client, experiment.experiment_id, "pretrain", training_id)
    assert killed.info.status == "KILLED", "a run whose process died must not stay RUNNING"
    assert killed.data.tags[tracking.CLOSED_BY_TAG] == finished.info.run_id  # closed when the next run started
    assert finished.info.status == "FINISHED"
    assert killed.data.tags[f"{tracking.RESUMED_TAG}pretrain"] == "0"
    assert int(finished.data.tags[f"{tracking.RESUMED_TAG}pretrain"]) >= EVERY
    assert (restarted["root"] / "data" / "06_models" / "checkpoints" / training_id).is_dir()  # the id: its folder


def test_the_finished_run_holds_every_step_once_and_none_of_the_discarded_work(restarted):
    client, root = restarted["client"], restarted["root"]
    _, (killed, finished) = _attempts(client)
    resumed_from = int(finished.data.tags[f"{tracking.RESUMED_TAG}pretrain"])
    history = pd.read_csv(root / "data/07_model_output/pretrain_history.csv")
    for key in ("pretrain/loss", "pretrain/lr", "pretrain/grad_norm"):
        logged = sorted(client.get_metric_history(finished.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(1, STEPS + 1)), key  # 1..N, each once
    logged = sorted(client.get_metric_history(finished.info.run_id, "pretrain/loss"), key=lambda m: m.step)
    assert [m.value for m in logged] == history["loss"].tolist()  # the trajectory that made the weights
    # The killed run logged only steps a checkpoint held: none past the one the next attempt resumed from.
    dead = [m.step for m in client.get_metric_history(killed.info.run_id, "pretrain/loss")]
    assert len(dead) == len(set(dead)) and max(dead, default=0) <= resumed_from


def test_the_final_student_is_a_registered_model_equal_to_the_weights_file(restarted):
    client, root = restarted["client"], restarted["root"]
    (version,) = client.search_model_versions("name = 'eva-student'")
    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    try:
        logged = mlflow.pytorch.load_model(f"models:/eva-student/{version.version}")  # a torch.export program
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    x = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))  # a batch of 3: the example has 1
    weights = root / "data" / "06_models" / "eva_student.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert state["lm_head.weight"].dtype == torch.float16  # the file's weights, not the in-memory fp32 ones
    params = StudentConfigDataset(str(root / "data" / "05_model_input" / "student_config.yml")).load()
    student = EvaMIM(student_config(params.model, target_dim=state["lm_head.weight"].shape[0]), initialise=False)
    load_official_checkpoint(student, weights)
    with torch.no_grad():
        assert torch.equal(logged(x), student.eval().forward_features(x))
