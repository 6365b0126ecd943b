"""The student_config pipeline: the pretrain block resolved once into the dataset every later stage reads."""

from __future__ import annotations

import yaml

from eva_pipeline.config import PretrainParams


def test_student_config_is_the_validated_pretrain_block(workspace):
    workspace.run("student_config")
    resolved = workspace.catalog.load("student_config")
    assert isinstance(resolved, PretrainParams)
    assert resolved == workspace.catalog.load("params:pretrain")  # the block as validated, every default filled in
    document = yaml.safe_load(workspace.path("student_config").read_text())
    assert document["pretrain"]["max_steps"] == workspace.params["pretrain"]["max_steps"]
    assert document["pretrain"]["deepspeed"]["loss_scale"]["hysteresis"] == 2  # a default conf/ need not write


def test_only_the_resolving_node_reads_the_pretrain_block(pl):
    """Teacher targets, training and evaluation read the student's settings from the dataset, never the params."""
    from kedro.framework.project import configure_project

    from eva_pipeline.pipeline_registry import register_pipelines

    configure_project("eva_pipeline")
    pipeline = register_pipelines()["pretrain"]
    readers = sorted(node.name for node in pipeline.nodes if "params:pretrain" in node.inputs)
    assert readers == ["resolve_student_config"]
    consumers = {node.name for node in pipeline.nodes if "student_config" in node.inputs}
    assert {"compute_teacher_targets", "pretrain_student", "draw_mask_examples", "linear_probe"} <= consumers


def test_mlflow_hook_logs_the_dataset_as_the_pretrain_block(tmp_path):
    """A run of later stages alone (no params:pretrain input) still records pretrain.* params from the dataset."""
    import mlflow

    from eva_pipeline.hooks import MlflowRunHook
    from eva_test_support import make_params

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            MlflowRunHook().before_node_run(inputs={"student_config": make_params(epochs=3), "manifest": object()})
        params = mlflow.get_run(run.info.run_id).data.params
    finally:
        mlflow.set_tracking_uri(None)
    assert params["pretrain.epochs"] == "3" and params["pretrain.optimizer.lr"] == "0.001"
    assert not any(key.startswith(("student_config", "manifest")) for key in params)
