"""The project's MLflow hooks outside a session: kedro-mlflow's param logging without object dumps, and the weights a
run saves logged as registered MLflow models that give the weights files' outputs."""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import pytest
import torch
from kedro.io import DataCatalog

from eva_pipeline.hooks import MlflowModelHook, ProjectMlflowHook
from eva_pipeline.models import (
    ClassifierCheckpoint,
    EvaClassifier,
    EvaMIM,
    EvaVideoClassifier,
    get_config,
    load_classifier_checkpoint,
    load_official_checkpoint,
)
from eva_test_support import TINY, make_params

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")


@pytest.fixture
def active_run(tmp_path) -> Iterator[str]:
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("eva", artifact_location=str(tmp_path / "artifacts"))
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            yield run.info.run_id
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


def test_typed_params_reach_kedro_mlflow_without_their_object_dump(active_run):
    hook = ProjectMlflowHook()  # as before_pipeline_run configures it from mlflow.yml
    hook.flatten, hook.recursive, hook.sep, hook.long_params_strategy = True, True, ".", "truncate"
    inputs = {"params:pretrain": make_params(epochs=3), "params:plain": {"a": {"b": 1}}, "manifest": object()}
    hook.before_node_run(node=None, catalog=None, inputs=inputs, is_async=False)
    params = mlflow.get_run(active_run).data.params
    assert params == {"plain.a.b": "1"}  # the typed block is MlflowRunHook's, field by field (pretrain.epochs)
    assert "params:pretrain" in inputs  # the node still gets it


@pytest.mark.slow  # three torch.export programs
def test_saved_weights_become_registered_models_with_the_weights_files_outputs(active_run, tmp_path):
    config = get_config("eva_tiny_patch4_28", **TINY, target_dim=8)
    torch.manual_seed(0)
    student = EvaMIM(config)
    image = EvaClassifier(config, 3)
    video = EvaVideoClassifier(config, 2, num_frames=4, tubelet=2)
    catalog = DataCatalog.from_config({
        "eva_student": {"type": "eva_pipeline.datasets.EvaCheckpointDataset", "filepath": str(tmp_path / "s.pt")},
        "finetuned_models": {"type": "partitions.PartitionedDataset", "path": str(tmp_path / "ft"),
                             "dataset": "eva_pipeline.datasets.ClassifierCheckpointDataset", "filename_suffix": ".pt"},
        "finetuned_video_models": {"type": "partitions.PartitionedDataset", "path": str(tmp_path / "v"),
                                   "dataset": "eva_pipeline.datasets.ClassifierCheckpointDataset",
                                   "filename_suffix": ".pt"},
    })  # fmt: skip
    hook = MlflowModelHook()
    hook.before_pipeline_run(catalog=catalog)
    mlflow.log_metric("finetune/student/loss", 0.25, step=12)  # the run's last training step of that model
    saved = {
        "eva_student": student,
        "finetuned_models": {"student": ClassifierCheckpoint.from_modules(image, ["a", "b", "c"])},
        "finetuned_video_models": {"student_v400": ClassifierCheckpoint.from_modules(video, ["x", "y"])},
    }
    for name, data in saved.items():
        catalog.save(name, data)
        hook.after_dataset_saved(dataset_name=name, data=data)

    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    from_file = EvaMIM(config, initialise=False)
    load_official_checkpoint(from_file, tmp_path / "s.pt")  # fp16 on disk: not the module in memory
    with torch.no_grad():
        logged = mlflow.pytorch.load_model("models:/eva-student/1")
        assert torch.equal(logged(images), from_file.eval().forward_features(images))
        assert not torch.equal(logged(images), student.eval().forward_features(images))
        logged = mlflow.pytorch.load_model("models:/eva-finetune-student/1")
        expected = load_classifier_checkpoint(tmp_path / "ft" / "student.pt").classifier()(images)
        assert torch.equal(logged(images), expected)
        clips = torch.rand(2, 3, 4, 28, 28)
        logged = mlflow.pytorch.load_model("models:/eva-finetune-video-student_v400/1")
        expected = load_classifier_checkpoint(tmp_path / "v" / "student_v400.pt").classifier()(clips)
        assert torch.equal(logged(clips), expected)

    client = mlflow.MlflowClient()
    version = client.get_model_version("eva-finetune-student", "1")
    assert version.run_id == active_run and version.source.startswith("models:/m-")
    linked = client.get_logged_model(version.source.removeprefix("models:/")).metrics
    assert [(m.key, m.step) for m in linked] == [("finetune/student/loss", 12)]
