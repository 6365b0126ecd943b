"""The K400/K600/K700 stage: each K722 model fine-tuned on each target version (EVA: 16 frames, lr 1e-6, layer decay
0.95, 1 epoch on K400, 2 on K600/K700), its head rows taken from the K722 head by the saved class mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from eva_pipeline.config import PretrainParams, TargetVideoFinetuneParams
from eva_pipeline.finetune.video import head_rows, start_from_k722
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.finetune_common import history_frame, loss_figure, state_digest
from eva_pipeline.pipelines.video_common import train_video_run, video_stage_data

#: What a partitioned folder of checkpoints loads: ``{name: loader}``, or ``{name: checkpoint}`` in memory.
Models = Mapping[str, Callable[[], ClassifierCheckpoint] | ClassifierCheckpoint]


def target_run_name(start: str, target: str) -> str:
    """The name of the model of ``start``'s K722 run fine-tuned on ``target`` (a file of ``finetuned_video_models``)."""
    return f"{start}_{target}"


def finetune_video_targets(
    video_manifest: pd.DataFrame,
    class_mapping: dict[str, Any],
    video_intermediate_models: Models,
    student: PretrainParams,
    checkpoints: Path,
    params: TargetVideoFinetuneParams,
) -> tuple[dict[str, ClassifierCheckpoint], pd.DataFrame, dict, Figure]:
    """For each K722 run in ``params.runs`` and each version in ``params.targets``, one classifier of that version's
    classes at ``params.num_frames`` frames (pos_embed resized over time from the K722 model's), resumable from
    ``checkpoints`` -> ``{<run>_<target>: checkpoint}``."""
    missing = [run for run in params.runs if run not in video_intermediate_models]
    if missing:
        raise ValueError(
            f"no K722 model for run(s) {missing} (have {sorted(video_intermediate_models)}): finetune_video.runs must "
            "be runs of finetune_video_intermediate"
        )
    models, histories, summaries = {}, {}, {}
    for run in params.runs:
        loaded = video_intermediate_models[run]
        source: ClassifierCheckpoint = loaded() if callable(loaded) else loaded
        for target in params.targets:
            rows = head_rows(class_mapping, target)
            epochs = params.epochs_per_target.get(target, params.epochs)
            stage = params.model_copy(update={"epochs": epochs})
            classes, train, validation = video_stage_data(video_manifest, class_mapping, stage, target)
            name = target_run_name(run, target)
            models[name], histories[name], summaries[name] = train_video_run(
                f"finetune_video/{name}",
                stage,
                student,
                classes,
                train,
                validation,
                lambda model, source=source, rows=rows: start_from_k722(model, source, rows),
                f"k722:{state_digest(source.released)}:{target}",
                checkpoints,
            )
    history = history_frame(histories)
    summary = {"targets": params.targets, "runs": summaries}
    return models, history, summary, loss_figure(history, "Target video fine-tune loss, per K722 start and version")
