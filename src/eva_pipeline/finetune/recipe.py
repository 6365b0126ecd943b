"""A fine-tune stage's recipe built from its config: classifier, layer-decayed optimiser, schedule, EMA decay, mixing.

Each function turns part of a :class:`~eva_pipeline.config.FinetuneParams` block into the object the loop drives
(as ``training.recipe`` does for pre-training), so the dry run builds exactly what a stage trains with.
"""

from __future__ import annotations

import torch
from torch import nn

from eva_pipeline.config import FinetuneParams, ModelParams
from eva_pipeline.finetune.ema import decay_for_run
from eva_pipeline.finetune.mixing import EvenBatchMixup, build_mixing
from eva_pipeline.finetune.optim import build_finetune_adamw
from eva_pipeline.finetune.weights import stage_classifier
from eva_pipeline.models import EvaClassifier
from eva_pipeline.training.optim import AdamWConfig
from eva_pipeline.training.schedule import WarmupCosineSchedule


def make_classifier(params: FinetuneParams, student: ModelParams, num_classes: int) -> EvaClassifier:
    """The student's architecture as the stage's classifier (its size, drop path, frozen patch embedding)."""
    return stage_classifier(
        student.name,
        student.overrides,
        num_classes,
        params.img_size,
        drop_path_rate=params.drop_path_rate,
        freeze_patch_embed=params.freeze_patch_embed,
        head_init_scale=params.head_init_scale,
    )


def steps_per_epoch(params: FinetuneParams, num_items: int) -> int:
    """Full global batches per epoch (the training loader drops the last, incomplete one)."""
    steps = num_items // params.batch_size
    if steps < 1:
        raise ValueError(f"batch_size {params.batch_size} exceeds the {num_items} fine-tuning images")
    return steps


def make_optimizer(model: nn.Module, params: FinetuneParams) -> torch.optim.AdamW:
    """AdamW over the layer-decayed groups of the trainable parameters (frozen ones left out)."""
    o = params.optimizer
    config = AdamWConfig(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return build_finetune_adamw(model, config, o.layer_decay)


def make_schedule(params: FinetuneParams, steps: int) -> WarmupCosineSchedule:
    """Linear warmup from ``warmup_lr``, then cosine to ``min_lr``, over ``epochs`` of ``steps`` steps."""
    o = params.optimizer
    return WarmupCosineSchedule.from_epochs(
        base_value=o.lr,
        final_value=o.min_lr,
        epochs=params.epochs,
        steps_per_epoch=steps,
        warmup_epochs=o.warmup_epochs,
        start_value=o.warmup_lr,
    )


def ema_decay(params: FinetuneParams, total_steps: int) -> float | None:
    """The EMA's decay (None: no EMA): ``decay``, or one scaled to the run with ``run_fraction``."""
    e = params.ema
    if not e.enabled:
        return None
    return decay_for_run(total_steps, e.run_fraction, e.decay) if e.run_fraction else e.decay


def make_mixing(params: FinetuneParams, num_classes: int) -> tuple[EvenBatchMixup | None, nn.Module]:
    """(CutMix/Mixup or None, the loss that matches it)."""
    m = params.mixing
    return build_mixing(
        num_classes, cutmix_alpha=m.cutmix_alpha, mixup_alpha=m.mixup_alpha, label_smoothing=m.label_smoothing
    )
