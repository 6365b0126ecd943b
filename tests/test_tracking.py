"""The MLflow record's hygiene, read back through MLflow's client on a throw-away sqlite store: step logging in
batches, the tags that link a training's attempts, runs of dead processes closed, the experiment's kind, the runs
of one ``dvc repro`` under one parent, and models logged and registered."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from eva_pipeline import tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # inside mlflow's sqlite store


@pytest.fixture(scope="module")
def _store_uri(tmp_path_factory) -> Iterator[str]:
    """One sqlite store for the module (creating one takes seconds); the global tracking uri points at it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def store(_store_uri, tmp_path, request) -> tuple[str, MlflowClient, str]:
    """(tracking uri, client, id of an experiment of this test's own)."""
    client = MlflowClient(_store_uri)
    experiment = client.create_experiment(request.node.name, artifact_location=str(tmp_path / "artifacts"))
    return _store_uri, client, experiment


def test_metric_names_have_one_separator():
    assert tracking.metric_key("pretrain", "loss") == "pretrain/loss"
    assert tracking.metric_key("finetune/student/", "val_top1") == "finetune/student/val_top1"


def test_the_step_logger_logs_many_steps_in_batches_and_tags_its_training(store):
    uri, client, experiment = store
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    for run_id, resumed in zip(runs[:2], (0, 400), strict=True):
        logger = tracking.MlflowStepLogger(run_id, uri, prefix="finetune/student/")
        logger.started("fp123", resumed)
    tracking.MlflowStepLogger(runs[2], uri, prefix="pretrain/").started("fp123", 0)  # another stage, same id
    logger.log_steps((step, {"loss": -step / 1000, "lr": 1e-3}) for step in range(1, 601))  # 1,200 metrics
    history = client.get_metric_history(runs[1], "finetune/student/loss")
    assert sorted(m.step for m in history) == list(range(1, 601))
    found = tracking.training_runs(client, experiment, "finetune/student", "fp123")
    assert [r.info.run_id for r in found] == runs[:2]
    assert found[1].data.tags["eva.resumed_from_step.finetune/student"] == "400"
    tracking.MlflowStepLogger(runs[0], uri, prefix="pretrain/", rank=1).started("other", 9)  # rank 1 writes nothing
    assert "eva.training.pretrain" not in client.get_run(runs[0]).data.tags


def test_runs_of_dead_processes_on_this_host_are_closed_and_live_ones_left(store):
    _, client, experiment = store
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_tags = tracking.process_tags(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    other_host = {**tracking.process_tags(), tracking.HOST_TAG: "elsewhere"}
    reused_pid = {**tracking.process_tags(), tracking.PID_STARTED_TAG: "1.0"}  # this pid, but another process
    runs = {
        name: client.create_run(experiment, tags=tags).info.run_id
        for name, tags in {
            "dead": dead_tags,
            "alive": tracking.process_tags(),
            "elsewhere": other_host,
            "reused": reused_pid,
            "untagged": {},
        }.items()
    }
    assert not tracking.process_alive(dead_tags) and tracking.process_alive(tracking.process_tags())
    closed = tracking.close_dead_runs(client, experiment, closed_by="new-run")
    assert sorted(closed) == sorted([runs["dead"], runs["reused"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "reused": "KILLED",
                      "untagged": "RUNNING"}  # fmt: skip
    assert client.get_run(runs["dead"]).data.tags[tracking.CLOSED_BY_TAG] == "new-run"
    assert client.get_run(runs["dead"]).info.end_time is not None


def test_the_experiment_is_marked_as_model_training_unless_it_has_a_kind(store):
    _, client, experiment = store
    tracking.mark_model_development(client, experiment)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    other = client.create_experiment(f"chat-{experiment}", tags={"mlflow.experimentKind": "genai_development"})
    tracking.mark_model_development(client, other)
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "genai_development"  # a user's choice


@pytest.mark.slow  # two interpreters importing MLflow
def test_stage_commands_of_one_dvc_process_share_an_id(tmp_path):
    """This test process plays DVC: it runs two stage commands through a shell with ``DVC_STAGE`` set."""
    code = "from eva_pipeline.tracking import dvc_repro_id; print(dvc_repro_id())"
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    ids = [
        subprocess.run(
            f'"{sys.executable}" -c "{code}"', shell=True, env={**env, "DVC_STAGE": stage}, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        for stage in ("ingestion", "train_student")
    ]  # fmt: skip
    me = psutil.Process()
    assert ids == [f"{socket.gethostname()}:{me.pid}:{me.create_time():.0f}"] * 2
    assert tracking.dvc_repro_id({}) is None  # not under DVC


def test_the_stage_runs_of_one_dvc_repro_sit_under_one_parent(store):
    _, client, experiment = store
    stages = {name: client.create_run(experiment).info.run_id for name in ("ingestion", "train_student", "later")}
    parent = tracking.join_dvc_repro(client, stages["ingestion"], experiment, "host:1:2", "ingestion")
    same = tracking.join_dvc_repro(client, stages["train_student"], experiment, "host:1:2", "train_student")
    other = tracking.join_dvc_repro(client, stages["later"], experiment, "host:3:4", "ingestion")
    assert same == parent != other
    for name in ("ingestion", "train_student"):
        tags = client.get_run(stages[name]).data.tags
        assert tags["mlflow.parentRunId"] == parent and tags["eva.dvc_repro"] == "host:1:2"
        assert tags["eva.dvc_stage"] == name
    assert client.get_run(parent).info.status == "FINISHED"  # a container, never left RUNNING


def test_a_logged_model_is_registered_and_loads_back_with_the_same_outputs(store):
    _, client, experiment = store
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    example = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)).numpy()
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "pretrain/loss", -0.5, step=7)
    info = tracking.log_torch_model(model, example, name="tiny", registered_name="eva-tiny", run_id=run_id, step=7)
    assert info.registered_model_version == 1 and info.run_id == run_id
    loaded = mlflow.pytorch.load_model("models:/eva-tiny/1")
    x = torch.rand(4, 3, 2, 2)
    assert torch.equal(loaded(x), model(x))
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 2, 2)
    linked = client.get_logged_model(info.model_id).metrics  # the run's metrics of the training's last step
    assert [(m.key, m.step, m.value) for m in linked] == [("pretrain/loss", 7, -0.5)]
    assert len(client.get_metric_history(run_id, "pretrain/loss")) == 1  # linked, not logged twice
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert "torch==" in requirements  # pinned from this environment, not inferred


def test_a_model_whose_example_is_too_large_to_store_is_pickled_with_its_signature(store):
    _, client, experiment = store
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    example = torch.rand(2, 3, 2, 2).numpy()
    run_id = client.create_run(experiment).info.run_id
    info = tracking.log_torch_model(
        model, example, name="big", registered_name="eva-big", run_id=run_id, max_example_values=10
    )
    assert info.saved_input_example_info is None and info.signature is not None
    x = torch.rand(5, 3, 2, 2)
    assert torch.equal(mlflow.pytorch.load_model("models:/eva-big/1")(x), model(x))
