"""The target fine-tune (EVA's IN-1K stage): one run per start, same budget, for the classification table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import PretrainParams, TargetFinetuneParams
from eva_pipeline.finetune.data import ClassNames
from eva_pipeline.finetune.weights import load_finetune_start
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import ClassifierCheckpoint, EvaClassifier
from eva_pipeline.pipelines.finetune_common import (
    StartFn,
    history_frame,
    loss_figure,
    stage_data,
    state_digest,
    train_run,
)


def _starts(
    params: TargetFinetuneParams, classes: list[str], eva_student: dict[str, torch.Tensor], intermediate: object
) -> dict[str, tuple[StartFn, str]]:
    """How each run's classifier is initialised, and what identifies those weights."""
    starts: dict[str, tuple[StartFn, str]] = {}
    for run in params.runs:
        if run == "student":
            starts[run] = (
                lambda model: load_finetune_start(model, {"model": eva_student}),
                f"student:{state_digest(eva_student)}",
            )
        elif run == "random":
            starts[run] = (lambda model: None, "random")
        else:
            checkpoint: ClassifierCheckpoint = intermediate() if callable(intermediate) else intermediate

            def from_intermediate(model: EvaClassifier, checkpoint: ClassifierCheckpoint = checkpoint) -> None:
                if params.head == "reinit":
                    load_finetune_start(model, {"model": checkpoint.released}, reinit_head=True)
                else:
                    load_finetune_start(
                        model,
                        {"model": checkpoint.released},
                        source_classes=checkpoint.classes,
                        target_classes=classes,
                    )

            starts[run] = (from_intermediate, f"intermediate:{state_digest(checkpoint.released)}")
    return starts


def finetune_target(
    manifest: Manifest | pd.DataFrame,
    class_names: ClassNames,
    eva_student: dict[str, torch.Tensor],
    eva_intermediate: object,
    student: PretrainParams,
    checkpoints: Path,
    params: TargetFinetuneParams,
) -> tuple[dict[str, ClassifierCheckpoint], pd.DataFrame, dict, Figure]:
    """Fine-tune once per start in ``params.runs`` on the target classes (the intermediate model's head rows are
    taken by class name; its EMA weights when it kept them), each resumable from ``checkpoints``.

    ``eva_intermediate`` is read only when a run starts from it (a loader callable or the checkpoint itself).
    Returns ``{run: checkpoint}`` (the ``finetuned_models`` folder; the first run is the released model).
    """
    classes, train, validation = stage_data(manifest, class_names, params)
    models, histories, summaries = {}, {}, {}
    for run, (start, start_id) in _starts(params, classes, eva_student, eva_intermediate).items():
        models[run], histories[run], summaries[run] = train_run(
            f"finetune/{run}", params, student, classes, train, validation, start, start_id, checkpoints
        )  # MLflow: finetune/<run>/loss, ...
    history = history_frame(histories)
    summary = {"classes": len(classes), "images": len(train[0]), "runs": summaries}
    return models, history, summary, loss_figure(history, "Target fine-tune loss, per start")
