"""Image fine-tuning (EVA paper, image classification; EVA-01 ``run_class_finetuning.py``), Kedro-free: optimiser
groups with layer decay, augmentation, CutMix and label smoothing, EMA, and the starting weights of each stage."""

from eva_pipeline.finetune.augment import (
    EVA_RAND_AUGMENT,
    eval_transform,
    make_posterize_safe,
    safe_posterize,
    train_transform,
)
from eva_pipeline.finetune.ema import EVA_EMA_DECAY, create_ema, decay_for_run, update_ema
from eva_pipeline.finetune.mixing import EvenBatchMixup, build_mixing
from eva_pipeline.finetune.optim import build_finetune_adamw, frozen_parameter_names, layer_decay_param_groups
from eva_pipeline.finetune.weights import HeadMappingError, StartReport, load_finetune_start, remap_head

__all__ = [
    "EVA_EMA_DECAY",
    "EVA_RAND_AUGMENT",
    "EvenBatchMixup",
    "HeadMappingError",
    "StartReport",
    "build_finetune_adamw",
    "build_mixing",
    "create_ema",
    "decay_for_run",
    "eval_transform",
    "frozen_parameter_names",
    "layer_decay_param_groups",
    "load_finetune_start",
    "make_posterize_safe",
    "remap_head",
    "safe_posterize",
    "train_transform",
    "update_ema",
]
