"""Kedro-free entry point of one training rank: ``python -m eva_pipeline.training.worker <run.json>``.

The training node writes one frozen, fully resolved run file and starts ``world_size`` of these through the DeepSpeed
launcher (or torch elastic); each rank trains its share of every batch, every rank saves its checkpoint shard, and
rank 0 alone logs to the MLflow run the Kedro session opened and writes the final weights and history.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eva_pipeline.config import PretrainParams, TeacherParams
from eva_pipeline.fileio import replace_atomically
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import ParquetRows
from eva_pipeline.models import save_official_checkpoint
from eva_pipeline.runtime.launch import RunFile
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.teachers import create_teacher
from eva_pipeline.tracking import MlflowStepLogger
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.step import TargetFn
from eva_pipeline.training.validation import ValidationSet, open_validation_set

WEIGHTS_FILE = "student_fp32.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class RunSpec(RunFile):
    """Everything a rank needs, as plain JSON: parameters, where the data and targets are, where results go."""

    params: dict[str, Any]
    images: str  # the manifest Parquet; its "pretrain" rows, in order, are the sample indices
    target_dim: int
    output_dir: str
    checkpoint_dir: str  # resumable state, one sub-folder per training configuration
    targets_store: str | None = None  # cached targets; None -> online teacher
    teacher: dict[str, Any] | None = None
    teacher_device: str = "auto"
    data_fingerprint: str = ""
    mlflow: dict[str, str] | None = field(default=None)  # {"tracking_uri": ..., "run_id": ...}
    validation: dict[str, Any] | None = None  # {"store", "split", "manifest"}: the held-out set; None: no validation


def _targets(spec: RunSpec, rank: int) -> TargetFn | object:
    """The stored targets' reader (read by the loader), or the online teacher as a per-batch function."""
    if spec.targets_store is not None:
        return TargetStore(spec.targets_store).reader()
    from eva_pipeline.runtime.device import resolve_device

    teacher_params = TeacherParams.model_validate(spec.teacher)
    device = resolve_device(spec.teacher_device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    teacher = create_teacher(teacher_params.kind, **{"device": str(device), **teacher_params.options})
    params = PretrainParams.model_validate(spec.params)
    from eva_pipeline.models import get_config

    grid = get_config(params.model.name, **params.model.overrides).grid_size
    return lambda index, x: teacher.targets(x.to(device), (grid, grid))


def _validation(spec: RunSpec, params: PretrainParams) -> ValidationSet | None:
    if spec.validation is None:
        return None
    from eva_pipeline.models import get_config

    v = spec.validation
    img_size = get_config(params.model.name, **params.model.overrides).img_size
    rows = ParquetRows(v["manifest"], v["split"])
    return open_validation_set(rows, v["store"], img_size, params.validation.every_steps, params.validation.batch_size)


def run(spec: RunSpec) -> None:
    rank = int(os.environ.get("RANK", "0"))
    params = PretrainParams.model_validate(spec.params)
    if params.device in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logger = None
    if spec.mlflow is not None:
        logger = MlflowStepLogger(spec.mlflow["run_id"], spec.mlflow["tracking_uri"], prefix="pretrain/", rank=rank)
    result = run_pretraining(
        params,
        ManifestPixels(ParquetRows(spec.images, "pretrain")),  # streamed: no rank holds the listing
        _targets(spec, rank),
        spec.target_dim,
        checkpoint_dir=spec.checkpoint_dir,
        metrics_fn=logger,
        data_fingerprint=spec.data_fingerprint,
        validation=_validation(spec, params),
    )
    if rank == 0:
        out = Path(spec.output_dir)
        save_official_checkpoint(result.model, out / WEIGHTS_FILE, dtype=None)
        text = json.dumps({"history": result.run_history, "steps": result.steps})
        replace_atomically(out / HISTORY_FILE, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    args = [a for a in args if not a.startswith("--local_rank")]  # the DeepSpeed launcher may append it
    if len(args) != 1:
        raise SystemExit("usage: python -m eva_pipeline.training.worker <run.json>")
    run(RunSpec.read(Path(args[0])))


if __name__ == "__main__":
    main()
