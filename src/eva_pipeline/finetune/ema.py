"""Exponential moving average of the fine-tuned weights (EVA-01 IN-1K stage: ``--model_ema``, decay 0.9999, updated
after every optimiser step; the released IN-1K weights are the EMA), kept by timm's ``ModelEmaV3``.

Without warm-up the rule is the official one (timm's ``ModelEma``, which EVA-01 uses):
``ema <- decay * ema + (1 - decay) * model`` for every floating tensor of the state dict.

Trap for short runs: the EMA averages over about ``1 / (1 - decay)`` steps, 10,000 at 0.9999, so after a few hundred
demo steps it is still almost the starting weights (after 100 steps 99% of it is: 0.9999^100 = 0.990). A short run
uses timm's warm-up (``decay_k = min(decay, 1 - k^-power)`` at step k >= 2, the model copied at step 1) or a decay
scaled to its length (:func:`decay_for_run`); the paper's 0.9999 is meant for its ~25,000-step IN-1K fine-tune.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

#: EVA-01 IN-1K fine-tuning (``--model_ema_decay`` default of ``run_class_finetuning.py``).
EVA_EMA_DECAY = 0.9999


def create_ema(
    model: nn.Module,
    decay: float = EVA_EMA_DECAY,
    *,
    warmup: bool = False,
    warmup_power: float = 2 / 3,
    dtype: torch.dtype | None = None,
) -> ModelEmaV3:
    """A copy of ``model`` (eval mode) to average into; ``dtype=torch.float32`` keeps an fp32 EMA of a half model,
    whose own precision would round ``(1 - decay) * (model - ema)`` away."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=warmup_power, dtype=dtype)


def update_ema(ema: ModelEmaV3, model: nn.Module, step: int) -> float:
    """Average ``model`` into ``ema`` after optimiser step ``step`` (1-based); returns the decay used.

    Without warm-up the decay is constant from the first step, as in the official code (timm's ``get_decay(step)``
    would copy the model at step 1 even then, so no step is passed to it).
    """
    if step < 1:
        raise ValueError(f"step counts optimiser steps from 1, got {step}")
    decay = ema.get_decay(step if ema.use_warmup else None)
    ema.update(model, step=step if ema.use_warmup else None)
    return decay


def decay_for_run(total_steps: int, window_fraction: float = 0.1, max_decay: float = EVA_EMA_DECAY) -> float:
    """A decay whose averaging window ``1 / (1 - decay)`` is ``window_fraction`` of the run, at most ``max_decay``
    (0.9999 only once the run has 100,000 steps at the default fraction)."""
    if total_steps < 1 or not 0.0 < window_fraction <= 1.0:
        raise ValueError(f"need total_steps >= 1 and window_fraction in (0, 1], got {total_steps}, {window_fraction}")
    window = max(1.0, window_fraction * total_steps)
    return min(max_decay, 1.0 - 1.0 / window)
