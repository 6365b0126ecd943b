"""Kedro-free entry point of one fine-tuning rank: ``python -m eva_pipeline.finetune.worker <run.json>``.

A fine-tune node with ``world_size > 1`` builds the stage's classifier and applies its start weights once, writes them
with the stage's rows and labels and a frozen run file, and starts ``world_size`` of these through the DeepSpeed
launcher (or torch elastic), as pre-training does (``eva_pipeline.training.worker``). Every rank loads the same
initial weights and trains its share of every global batch; rank 0 alone logs to the MLflow run of the Kedro session
and writes the trained classifier (with its EMA) and the run's history, which the node reads back.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from eva_pipeline.config import FinetuneParams, TargetFinetuneParams, TargetVideoFinetuneParams, VideoFinetuneParams
from eva_pipeline.fileio import replace_atomically
from eva_pipeline.finetune.augment import eval_transform, train_transform
from eva_pipeline.finetune.loop import run_finetuning
from eva_pipeline.finetune.video import eval_clips, train_clips
from eva_pipeline.loader.classification import ClassificationDataset
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import FrameRows
from eva_pipeline.models import (
    ClassifierCheckpoint,
    EvaClassifier,
    EvaVideoClassifier,
    load_classifier_checkpoint,
    save_classifier_checkpoint,
)
from eva_pipeline.runtime.launch import RunFile
from eva_pipeline.tracking import MlflowStepLogger

WORKER_MODULE = "eva_pipeline.finetune.worker"
RESULT_FILE = "classifier.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class FinetuneRunSpec(RunFile):
    """Everything a rank needs, as plain JSON: the stage block, the initial classifier, the data, where results go."""

    params: dict[str, Any]
    initial: str  # a ClassifierCheckpoint file: the classifier with its start weights applied, and its classes
    train_rows: str  # Parquet of the training rows (manifest columns), in order
    train_labels: str  # .npy of their labels in the head's order
    checkpoint_dir: str
    output_dir: str
    start: str = ""  # what identifies the start weights and data (the checkpoints' fingerprint)
    validation_rows: str | None = None
    validation_labels: str | None = None
    mlflow: dict[str, str] | None = field(default=None)  # {"tracking_uri": ..., "run_id": ...}
    prefix: str = ""  # of the MLflow metric names, e.g. "finetune/student/"


def stage_params(data: dict[str, Any]) -> FinetuneParams:
    """The stage block as the node had it: an image stage (the target stage's carries ``runs``) or a video stage
    (``num_frames``; the target stage's carries ``targets``)."""
    if "num_frames" in data:
        return (TargetVideoFinetuneParams if "targets" in data else VideoFinetuneParams).model_validate(data)
    return (TargetFinetuneParams if "runs" in data else FinetuneParams).model_validate(data)


def _dataset(rows: str, labels: str, transform: object, seed: int) -> ClassificationDataset:
    frame = pd.read_parquet(rows)
    return ClassificationDataset(ManifestPixels(FrameRows(frame)), np.load(labels), transform, seed)


def _datasets(spec: FinetuneRunSpec, params: FinetuneParams) -> tuple[Any, Any]:
    """The rank's training and validation datasets: images through the stage's transforms, or clips."""
    has_validation = spec.validation_rows is not None and spec.validation_labels is not None
    if isinstance(params, VideoFinetuneParams):
        train = train_clips(pd.read_parquet(spec.train_rows), np.load(spec.train_labels), params)
        if not has_validation:
            return train, None
        return train, eval_clips(pd.read_parquet(spec.validation_rows), np.load(spec.validation_labels), params)
    a = params.augmentation
    train = _dataset(
        spec.train_rows,
        spec.train_labels,
        train_transform(params.img_size, a.scale, auto_augment=a.auto_augment, hflip=a.hflip, re_prob=a.re_prob),
        params.seed,
    )
    validation = None
    if has_validation:
        transform = eval_transform(params.img_size, params.crop_pct)
        validation = _dataset(spec.validation_rows, spec.validation_labels, transform, params.seed)
    return train, validation


def run(spec: FinetuneRunSpec) -> None:
    rank = int(os.environ.get("RANK", "0"))
    params = stage_params(spec.params)
    if params.device in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    initial = load_classifier_checkpoint(spec.initial)
    if isinstance(params, VideoFinetuneParams):
        model: EvaClassifier = EvaVideoClassifier(
            initial.config, len(initial.classes), **initial.video, freeze_patch_embed=params.freeze_patch_embed
        )
    else:
        model = EvaClassifier(initial.config, len(initial.classes), freeze_patch_embed=params.freeze_patch_embed)
    model.load_state_dict(initial.model, strict=True)
    train, validation = _datasets(spec, params)
    logger = None
    if spec.mlflow is not None:
        logger = MlflowStepLogger(spec.mlflow["run_id"], spec.mlflow["tracking_uri"], prefix=spec.prefix, rank=rank)
    result = run_finetuning(
        params,
        model,
        train,
        checkpoint_dir=spec.checkpoint_dir,
        start=spec.start,
        validation=validation,
        metrics_fn=logger,
        desc=spec.prefix.rstrip("/") or "finetune",
    )
    if rank == 0:
        out = Path(spec.output_dir)
        trained = ClassifierCheckpoint.from_modules(result.model, initial.classes, result.ema)
        save_classifier_checkpoint(trained, out / RESULT_FILE)
        text = json.dumps({"history": result.run_history, "steps": result.steps, "ema_decay": result.ema_decay})
        replace_atomically(out / HISTORY_FILE, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    args = [a for a in args if not a.startswith("--local_rank")]  # the DeepSpeed launcher may append it
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {WORKER_MODULE} <run.json>")
    run(FinetuneRunSpec.read(Path(args[0])))


if __name__ == "__main__":
    main()
