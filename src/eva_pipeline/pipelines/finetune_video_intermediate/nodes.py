"""The K722 stage (EVA's intermediate video fine-tune): the image weights as a space-time classifier of every
Kinetics-722 class, one run per start (the EVA student, random init: a baseline of the same budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import PretrainParams, VideoFinetuneParams
from eva_pipeline.finetune.video import start_from_image
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.finetune_common import history_frame, loss_figure, state_digest
from eva_pipeline.pipelines.video_common import train_video_run, video_stage_data


def finetune_video_intermediate(
    video_manifest: pd.DataFrame,
    class_mapping: dict[str, Any],
    eva_student: dict[str, torch.Tensor],
    eva_intermediate: ClassifierCheckpoint,
    student: PretrainParams,
    checkpoints: Path,
    params: VideoFinetuneParams,
) -> tuple[dict[str, ClassifierCheckpoint], pd.DataFrame, dict, Figure]:
    """One K722 classifier per start in ``params.runs`` (``student``: the MIM weights inflated to space-time;
    ``image_intermediate``: the image intermediate stage's classifier, its EMA where kept, as EVA starts from its
    IN-21K model; ``random``: the same model from its init), each resumable from ``checkpoints`` ->
    ``{run: checkpoint}``."""
    classes, train, validation = video_stage_data(video_manifest, class_mapping, params, params.data.dataset)
    starts = {
        "student": (lambda model: start_from_image(model, eva_student), f"student:{state_digest(eva_student)}"),
        "image_intermediate": (
            lambda model: start_from_image(model, eva_intermediate.released),
            f"image_intermediate:{state_digest(eva_intermediate.released)}",
        ),
        "random": (lambda model: None, "random"),
    }
    models, histories, summaries = {}, {}, {}
    for run in params.runs:
        start, start_id = starts[run]
        models[run], histories[run], summaries[run] = train_video_run(
            f"finetune_video_intermediate/{run}", params, student, classes, train, validation, start, start_id,
            checkpoints,
        )  # fmt: skip
    history = history_frame(histories)
    summary = {"dataset": params.data.dataset, "classes": len(classes), "clips": len(train[0]), "runs": summaries}
    return models, history, summary, loss_figure(history, f"{params.data.dataset} video fine-tune loss, per start")
