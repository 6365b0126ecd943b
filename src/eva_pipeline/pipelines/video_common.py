"""What the two video fine-tune stages' nodes share: a stage's clips and one run from given start weights. The work
itself is ``eva_pipeline.finetune.video``'s and the image stages' loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from eva_pipeline.config import PretrainParams, VideoFinetuneParams
from eva_pipeline.finetune.video import clip_rows, dataset_classes, eval_clips, make_video_classifier, train_clips
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.finetune_common import fit, run_identity, train_distributed

#: Clip manifest columns that identify a clip's frames (a run's checkpoints are tied to them).
CLIP_COLUMNS = ("clip_id", "path", "num_frames")


def video_stage_data(
    manifest: pd.DataFrame, mapping: dict[str, Any], params: VideoFinetuneParams, dataset: str
) -> tuple[list[str], tuple[pd.DataFrame, Any], tuple[pd.DataFrame, Any] | None]:
    """A video stage's classes, training clips (label budget applied) and held-out clips (None: no validation)."""
    classes = dataset_classes(mapping, dataset)
    train = clip_rows(manifest, dataset, "train", per_class=params.data.per_class)
    v = params.validation
    validation = None if v.split is None else clip_rows(manifest, dataset, v.split, keep=v.num_clips)
    return classes, train, validation


def train_video_run(
    run: str,
    params: VideoFinetuneParams,
    student: PretrainParams,
    classes: list[str],
    train: tuple[pd.DataFrame, Any],
    validation: tuple[pd.DataFrame, Any] | None,
    start: Any,
    start_id: str,
    checkpoints: Path,
) -> tuple[ClassifierCheckpoint, list[dict], dict[str, float]]:
    """One video run: the student's architecture as a space-time classifier, initialised by ``start`` (from a seeded
    init, so random init is reproducible), trained by the image stages' loop on clips."""
    torch.manual_seed(params.seed)
    model = make_video_classifier(params, student.model, len(classes))
    start(model)
    identity = run_identity(start_id, *train, columns=CLIP_COLUMNS)
    if params.world_size > 1:  # the launched ranks of eva_pipeline.finetune.worker, as the image stages
        return train_distributed(run, params, classes, model, train, validation, identity, checkpoints)
    val_set = None if validation is None else eval_clips(*validation, params)
    return fit(run, params, model, classes, train_clips(*train, params), val_set, identity, checkpoints)
