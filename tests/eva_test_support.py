"""Helpers shared by several test folders (on the pytest path through ``pythonpath = ["tests"]``)."""

from __future__ import annotations

import copy

from eva_pipeline.config import PretrainParams

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_hidden_dim": 64, "drop_path_rate": 0.0}


def make_params(**changes) -> PretrainParams:
    """A tiny CPU pre-training config (checkpoint every 2 steps, keep 2); ``changes`` merge in (nested).

    Where checkpoints go is not a parameter: ``run_pretraining(..., checkpoint_dir=...)`` takes the folder."""
    base = {
        "model": {"name": "eva_tiny_patch4_28", "overrides": dict(TINY)},
        "masking": {"num_masking_patches": 20, "min_num_patches": 4},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 1, "weight_decay": 0.05},
        "epochs": 2,
        "batch_size": 8,
        "device": "cpu",
        "seed": 0,
        "checkpoint": {"every_steps": 2, "keep_last": 2},
    }

    return PretrainParams.model_validate(merge_nested(base, copy.deepcopy(changes)))


def merge_nested(into: dict, new: dict) -> dict:
    """Merge ``new`` into ``into`` in place, recursing into dicts present in both."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_nested(into[key], value)
        else:
            into[key] = value
    return into
