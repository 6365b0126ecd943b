"""One KedroSession run of the whole ``pretrain`` pipeline on the tiny config, then what MLflow recorded.

The project is a copy of conf/base plus a ``test`` env (tiny parameters, MLflow sqlite DB in tmp); the hooks
(preflight, kedro-mlflow, typed params) are the project's own. Nothing may be written in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from mlflow.tracking import MlflowClient

from eva_pipeline.config import PARAMETER_BLOCKS

STEP_METRICS = ("pretrain/loss", "pretrain/lr", "pretrain/grad_norm", "pretrain/images_per_second")
TOP1 = ("probe_top1_pretrained", "probe_top1_random", "probe_top1_teacher")

# every test reads one whole KedroSession run (its module fixture): `make test-fast` skips them
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, pl) -> dict:
    repo_data_before = pl.file_listing(pl.PROJECT_ROOT / "data")
    repo_mlflow = [pl.PROJECT_ROOT / name for name in ("mlflow.db", "mlruns")]
    repo_mlflow_before = [p.exists() and p.stat().st_mtime_ns for p in repo_mlflow]
    with (
        pl.project_context(tmp_path_factory.mktemp("session") / "project") as root,
        KedroSession.create(project_path=root, env="test") as session,
    ):
        session.run(pipeline_names=["pretrain"])
        left_open = mlflow.active_run()
    return {
        "root": root,
        "left_open": left_open,
        "repo_data_unchanged": pl.file_listing(pl.PROJECT_ROOT / "data") == repo_data_before,
        "repo_mlflow_unchanged": [p.exists() and p.stat().st_mtime_ns for p in repo_mlflow] == repo_mlflow_before,
    }


def test_pretrain_session_run_end_to_end(pretrain_run, pl):
    root: Path = pretrain_run["root"]
    data = root / "data"
    for produced in (
        "03_primary/manifest.parquet",
        "03_primary/class_names.json",
        "04_feature/teacher_targets/receipt.json",
        "04_feature/teacher_targets/meta.json",
        "06_models/eva_student.pt",
        "07_model_output/pretrain_history.csv",
        "08_reporting/pretrain_summary.json",
        "08_reporting/probe_metrics.json",
        "08_reporting/evaluation/probe_top1.png",
        "08_reporting/pretrain/mask_examples.png",
        "08_reporting/pretrain/pretrain_loss.png",
        "05_model_input/student_config.yml",
        "08_reporting/ingestion/ingestion_report.json",
    ):
        assert (data / produced).is_file(), produced
    assert any((data / "06_models" / "checkpoints").rglob("*"))
    assert json.loads((data / "08_reporting/pretrain_summary.json").read_text())["steps"] == pl.STEPS
    assert pretrain_run["repo_data_unchanged"], "the run wrote into the repository's data/"
    assert pretrain_run["repo_mlflow_unchanged"], "the run wrote into the repository's MLflow store"


def test_mlflow_run_records_params_step_metrics_probe_and_artifacts(pretrain_run, pl):
    root: Path = pretrain_run["root"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "eva_pipeline"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert pretrain_run["left_open"] is None, "a second session in this process would log into this run"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root)

    params = run.data.params  # flattened field by field, not one truncated repr per block
    assert params["pretrain.optimizer.lr"] == "0.001"
    assert params["pretrain.batch_size"] == str(pl.BATCH)
    assert params["pretrain.masking.num_masking_patches"] == "20"
    assert params["pretrain.model.name"] == "eva_tiny_patch4_28"
    assert params["teacher_targets.teacher.kind"] == "efficientnet_lite0"
    assert params["ingestion.sources.0.limit"] == str(pl.PRETRAIN_IMAGES)
    assert params["evaluation.probe.C"] == "1.0"
    blocks = set(PARAMETER_BLOCKS) | {"parameters"}  # a block logged whole is a dump
    dumps = sorted(k for k, v in params.items() if k in blocks or "Params(" in v or "PosixPath(" in v)
    assert not dumps, f"params logged as object dumps, not leaves: {dumps}"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's "Machine learning"
    assert {"eva.host", "eva.pid", "eva.training.pretrain"} <= set(run.data.tags)
    assert all(key.startswith(("ingestion/", "pretrain/", "evaluation/")) for key in run.data.metrics)
    (version,) = client.search_model_versions("name = 'eva-student'")
    assert version.run_id == run.info.run_id  # the final student, a registered model of this run

    for key in STEP_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, pl.STEPS + 1)), key
    logged = sorted(client.get_metric_history(run.info.run_id, "pretrain/loss"), key=lambda m: m.step)
    history = pd.read_csv(root / "data/07_model_output/pretrain_history.csv")
    assert [m.value for m in logged] == history["loss"].tolist()  # MLflow has the very losses the run recorded

    probe = json.loads((root / "data/08_reporting/probe_metrics.json").read_text())
    for key in TOP1:
        (logged,) = [k for k in run.data.metrics if k.endswith(key)]
        assert run.data.metrics[logged] == pytest.approx(probe[key])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"probe_top1.png", "mask_examples.png", "pretrain_loss.png", "student_config.yml"} <= artifacts
