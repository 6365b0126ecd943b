"""Training: objective, optimiser groups and schedules (engine, loop and checkpointing come with the pipeline)."""

from eva_pipeline.training.objective import mim_cosine_loss
from eva_pipeline.training.optim import (
    NO_WEIGHT_DECAY_NAMES,
    AdamWConfig,
    apply_lr,
    build_adamw,
    decays,
    param_groups,
)
from eva_pipeline.training.schedule import WarmupCosineSchedule

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "AdamWConfig",
    "WarmupCosineSchedule",
    "apply_lr",
    "build_adamw",
    "decays",
    "mim_cosine_loss",
    "param_groups",
]
