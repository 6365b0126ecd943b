"""The pre-training recipe built from its config: data order, masks, views, student, optimiser, schedule, seeds.

Each ``make_*`` turns one block of :class:`~eva_pipeline.config.PretrainParams` into the object the loop drives (as
MAE's ``main_pretrain.py`` sets up before its loop), so the dry run, the benchmarks and the probe's random-init
baseline build exactly what training builds. Everything is a pure function of the config and the seed.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from eva_pipeline.config import PretrainParams
from eva_pipeline.loader.augment import RandomResizedCropFlip
from eva_pipeline.loader.batches import BatchPlan
from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.masking import BlockMaskGenerator
from eva_pipeline.models import EvaMIM, get_config
from eva_pipeline.training.optim import AdamWConfig, build_adamw, param_groups
from eva_pipeline.training.schedule import WarmupCosineSchedule


def epoch_order(params: PretrainParams, num_items: int) -> EpochOrder:
    """The sample order of every epoch (a uniform permutation of all items): the same on every rank and after a
    restart."""
    return EpochOrder(num_items, params.seed)


def epoch_permutation(params: PretrainParams, epoch: int, num_items: int) -> np.ndarray:
    """The whole sample order of ``epoch`` (small data and tests: it is O(num_items))."""
    return epoch_order(params, num_items).epoch(epoch)


def make_mask_generator(params: PretrainParams, grid: int) -> BlockMaskGenerator:
    m = params.masking
    return BlockMaskGenerator(
        grid=(grid, grid),
        num_masking_patches=m.num_masking_patches,
        min_num_patches=m.min_num_patches,
        max_num_patches=m.max_num_patches,
        min_aspect=m.min_aspect,
    )


def make_augmentation(params: PretrainParams, size: int) -> RandomResizedCropFlip | None:
    a = params.augmentation
    return RandomResizedCropFlip(size, a.scale, a.ratio, a.flip_prob) if a.enabled else None


_STEP_SEED_TAG = 0x5EED_D409  # tells the step seeds apart from other draws of (seed, rank, step)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of ``rank``'s ``step`` (0-based): what drop path draws is a function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step, _STEP_SEED_TAG]).generate_state(1, dtype=np.uint64)[0])


def make_student(params: PretrainParams, target_dim: int) -> EvaMIM:
    """The student of ``params`` with an lm_head of ``target_dim`` (the teacher's width), initialised as EVA-01's
    ``modeling_pretrain.py`` does, from the current torch generator (seeded identically on every rank)."""
    return EvaMIM(get_config(params.model.name, **{**params.model.overrides, "target_dim": target_dim}))


def initial_student(params: PretrainParams, target_dim: int) -> EvaMIM:
    """The student exactly as training starts it (seeded by ``params.seed``): also the probe's random-init baseline."""
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    return make_student(params, target_dim)


def make_optimizer(model: torch.nn.Module, params: PretrainParams) -> torch.optim.AdamW:
    """AdamW over EVA's weight-decay groups (EVA-01 ``optim_factory.py``)."""
    o = params.optimizer
    config = AdamWConfig(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return build_adamw(param_groups(model, o.weight_decay), config)


def make_schedule(params: PretrainParams, steps_per_epoch: int) -> WarmupCosineSchedule:
    """Per-step LR: linear warmup, then half-cosine to ``min_lr`` over ``epochs`` of ``steps_per_epoch`` steps."""
    return WarmupCosineSchedule.from_epochs(
        base_value=params.optimizer.lr,
        final_value=params.optimizer.min_lr,
        epochs=params.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=params.optimizer.warmup_epochs,
    )


def make_plan(
    params: PretrainParams, pixels: object, img_size: int, grid: int, rank: int, world: int, stored: object = None
) -> BatchPlan:
    """What the loader needs to build any step's batch of ``rank``
    (see :class:`~eva_pipeline.loader.batches.BatchPlan`)."""
    return BatchPlan(
        pixels=pixels,
        order=epoch_order(params, len(pixels)),
        global_batch=params.batch_size,
        rank=rank,
        world_size=world,
        img_size=img_size,
        seed=params.seed,
        masker=make_mask_generator(params, grid),
        view_mode=_view_mode(params, stored),
        augment=make_augmentation(params, img_size),
        targets=stored,
    )


def _view_mode(params: PretrainParams, stored: object) -> str:
    if stored is not None and getattr(stored, "has_crops", False):
        return "stored"
    return "augment" if params.augmentation.enabled else "resize"


def training_fingerprint(params: PretrainParams, num_items: int, target_dim: int, data_fingerprint: str = "") -> str:
    """What a checkpoint must agree with to be resumed: everything that shapes the trajectory.

    Where checkpoints go, how often, ``max_steps`` (a smoke-run cut-off) and validation do not change the trajectory.
    """
    shaping = params.model_dump(
        mode="json",
        exclude={
            "checkpoint",
            "max_steps",
            "log_every_steps",
            "mask_examples",
            "device",
            "distributed",
            "compile",
            "validation",  # evaluating draws nothing and updates nothing
        },
    )
    blob = json.dumps(
        {"params": shaping, "num_items": num_items, "target_dim": target_dim, "data": data_fingerprint}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
