"""Thin nodes over ``eva_pipeline.training``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from eva_pipeline.config import PretrainParams, TeacherTargetsParams
from eva_pipeline.data import load_images, load_targets
from eva_pipeline.evaluation import loss_curve, mask_overview
from eva_pipeline.pipelines.common import build_teacher, split_rows, student_config
from eva_pipeline.preflight import check_augmentation, raise_if_problems
from eva_pipeline.tracking import active_run_logger
from eva_pipeline.training.loop import batch_masks, cached_targets, make_mask_generator, run_pretraining


def pretrain_student(
    manifest: pd.DataFrame, targets_receipt: dict, params: PretrainParams, teacher_params: TeacherTargetsParams
) -> tuple[nn.Module, pd.DataFrame, dict, Figure]:
    """Pre-train the student; per-step metrics stream to the MLflow run while it trains."""
    rows = split_rows(manifest, "pretrain")
    raise_if_problems(check_augmentation(params, teacher_params))
    images = load_images(rows)
    if targets_receipt["mode"] == "cached":
        targets = load_targets(targets_receipt["store"])
        if targets.shape[0] != len(rows):
            raise ValueError(
                f"stored teacher targets cover {targets.shape[0]} images but the manifest has {len(rows)} "
                f"pre-training images: re-run the teacher_targets pipeline"
            )
        target_fn, target_dim = cached_targets(targets), int(targets.shape[-1])
    else:
        teacher = build_teacher(teacher_params.teacher, teacher_params.device)
        grid = tuple(targets_receipt["grid"])
        target_fn, target_dim = (lambda index, x: teacher.targets(x, grid)), teacher.target_dim
    result = run_pretraining(
        params,
        images,
        target_fn,
        target_dim,
        metrics_fn=active_run_logger(prefix="pretrain/"),
        data_fingerprint=json.dumps(
            {k: targets_receipt.get(k) for k in ("manifest_digest", "teacher", "mode")}, sort_keys=True
        ),
    )
    history = pd.DataFrame(result.history)
    history.insert(0, "step", np.arange(result.resumed_from_step + 1, result.resumed_from_step + 1 + len(history)))
    figure = loss_curve(history["step"].to_numpy(), history["loss"].to_numpy(), title="EVA pre-training loss (-cos)")
    return result.model, history, result.summary(), figure


def draw_mask_examples(manifest: pd.DataFrame, params: PretrainParams) -> Figure:
    """What block-wise masking hides on real pre-training images (epoch 0 masks of the first samples)."""
    rows = split_rows(manifest, "pretrain").head(params.mask_examples)
    config = student_config(params.model)
    masks = batch_masks(make_mask_generator(params, config.grid_size), params.seed, 0, np.arange(len(rows)))
    grid = config.grid_size
    return mask_overview(load_images(rows), masks.numpy().reshape(-1, grid, grid), max_images=params.mask_examples)


def resolve_run_config(params: PretrainParams, teacher_params: TeacherTargetsParams) -> dict:
    """The settings that shape the student, every default filled in, as the run used them (an MLflow artifact).

    Of the teacher block only what the student depends on (which teacher, cached or online) is recorded, so the
    record changes exactly when DVC's tracked parameters of this stage do.
    """
    teacher = teacher_params.model_dump(mode="json", include={"teacher", "mode"})
    return {"pretrain": params.model_dump(mode="json"), "teacher_targets": teacher}
