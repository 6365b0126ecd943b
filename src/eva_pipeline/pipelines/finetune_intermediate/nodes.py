"""The intermediate fine-tune (EVA's IN-21K stage): the pre-trained student on the broad label space."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import FinetuneParams, PretrainParams
from eva_pipeline.finetune.data import ClassNames
from eva_pipeline.finetune.weights import load_finetune_start
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.finetune_common import (
    history_frame,
    loss_figure,
    stage_data,
    state_digest,
    train_run,
)

RUN = "intermediate"


def finetune_intermediate(
    manifest: Manifest | pd.DataFrame,
    class_names: ClassNames,
    eva_student: dict[str, torch.Tensor],
    student: PretrainParams,
    checkpoints: Path,
    params: FinetuneParams,
) -> tuple[ClassifierCheckpoint, pd.DataFrame, dict, Figure]:
    """Fine-tune the EVA student on every class of ``params.data.sources`` (a fresh head; the student's MIM-only
    tensors are ignored), resumable from ``checkpoints`` (``intermediate_checkpoints``)."""
    classes, train, validation = stage_data(manifest, class_names, params)
    checkpoint, records, summary = train_run(
        "finetune_intermediate",  # MLflow: finetune_intermediate/loss, ...
        params,
        student,
        classes,
        train,
        validation,
        start=lambda model: load_finetune_start(model, {"model": eva_student}),
        start_id=f"student:{state_digest(eva_student)}",
        checkpoints=checkpoints,
    )
    history = history_frame({RUN: records})
    summary = {"classes": len(classes), "images": len(train[0]), **summary}
    return checkpoint, history, summary, loss_figure(history, "Intermediate fine-tune loss")
