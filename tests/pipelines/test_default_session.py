"""One KedroSession run of the default pipeline (the whole DAG: pre-training, both fine-tunes, the classification
table, the video stages) on the tiny config, then what MLflow recorded of the fine-tune stages and the tables."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # a whole (tiny) DAG in one session


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, pl) -> dict:
    with (
        pl.project_context(tmp_path_factory.mktemp("default") / "project") as root,
        KedroSession.create(project_path=root, env="test") as session,
    ):
        session.run()  # no pipeline named: __default__
        left_open = mlflow.active_run()
    return {"root": root, "left_open": left_open}


def test_the_default_pipeline_runs_the_whole_dag_into_one_mlflow_run(default_run, pl) -> None:
    root: Path = default_run["root"]
    data = root / "data"
    for produced in (
        "06_models/eva_student.pt",
        "08_reporting/probe_metrics.json",
        "06_models/eva_intermediate.pt",
        "06_models/finetuned/intermediate.pt",
        "08_reporting/classification_metrics.json",
        "08_reporting/classification_table.md",
        "06_models/video_intermediate/student.pt",
        "06_models/finetuned_video/random_v700.pt",
        "08_reporting/video_metrics.json",
    ):
        assert (data / produced).is_file(), produced
    assert default_run["left_open"] is None
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "eva_pipeline"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"

    # per-step metrics of every fine-tune run, equal to the history files
    for run_name, prefix, history_file in (
        ("intermediate", "finetune_intermediate", "intermediate_history.csv"),
        ("intermediate", "finetune/intermediate", "finetune_history.csv"),
        ("student", "finetune/student", "finetune_history.csv"),
        ("random", "finetune/random", "finetune_history.csv"),
    ):
        history = pd.read_csv(data / "07_model_output" / history_file)
        history = history[history["run"] == run_name]
        logged = sorted(client.get_metric_history(run.info.run_id, f"{prefix}/loss"), key=lambda m: m.step)
        assert [m.step for m in logged] == history["step"].tolist(), run_name
        assert [m.value for m in logged] == pytest.approx(history["loss"].tolist()), run_name

    # the table: every run on every set, as in the JSON report
    report = json.loads((data / "08_reporting/classification_metrics.json").read_text())
    for run_name, entry in report["runs"].items():
        for set_name in report["sets"]:
            key = f"classification_eval/{run_name}/{set_name}/top1"
            assert run.data.metrics[key] == pytest.approx(entry[set_name]["top1"]), key
        assert run.data.metrics[f"classification_eval/{run_name}/gap"] == pytest.approx(entry["gap"])
    # the video table: every run, version and view, as in its JSON report
    video = json.loads((data / "08_reporting/video_metrics.json").read_text())
    for run_name, targets in video["runs"].items():
        for target, entry in targets.items():
            for view in video["views"]:
                key = f"video_eval/{run_name}/{target}/{view}/top1"
                assert run.data.metrics[key] == pytest.approx(entry[view]["top1"]), key
    history = pd.read_csv(data / "07_model_output/video_intermediate_history.csv")
    logged = client.get_metric_history(run.info.run_id, "finetune_video_intermediate/student/loss")
    assert sorted(m.step for m in logged) == history.loc[history["run"] == "student", "step"].tolist()
    # one naming scheme: <block>/<name>; every trained model registered under its stable name
    blocks = {"ingestion", "pretrain", "evaluation", "classification_eval", "video_eval", "finetune_intermediate",
              "finetune", "finetune_video_intermediate", "finetune_video"}  # fmt: skip
    assert {key.split("/")[0] for key in run.data.metrics} <= blocks
    registered = {m.name for m in client.search_registered_models()}
    expected = {"eva-student", "eva-intermediate", "eva-finetune-intermediate", "eva-finetune-student",
                "eva-finetune-random", "eva-video-intermediate-student", "eva-finetune-video-random_v700"}  # fmt: skip
    assert expected <= registered
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"classification_top1.png", "classification_table.md", "finetune_loss.png"} <= artifacts
    assert {"video_table.md", "report.json"} <= artifacts
    assert run.data.params["finetune.optimizer.layer_decay"] == str(
        pl.tiny_params(root)["finetune"]["optimizer"]["layer_decay"]
    )
