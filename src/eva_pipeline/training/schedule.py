"""Per-step learning-rate schedule: linear warmup from a start value, then half-cosine to a floor (EVA-01
``utils.py``).

Matches BEiT/EVA's ``cosine_scheduler`` value for value (warmup is ``linspace(start, base, warmup_steps)``, both ends
included), but is evaluated in closed form per step instead of materialising a million-entry array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """``base_value`` after ``warmup_steps`` linear steps from ``start_value``, cosine to ``final_value`` at the end."""

    base_value: float
    final_value: float
    total_steps: int
    warmup_steps: int = 0
    start_value: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    @classmethod
    def from_epochs(
        cls,
        base_value: float,
        final_value: float,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0,
        start_value: float = 0.0,
    ) -> WarmupCosineSchedule:
        """``cosine_scheduler``'s epoch-denominated form: warmup and length in epochs of ``steps_per_epoch`` steps."""
        return cls(
            base_value=base_value,
            final_value=final_value,
            total_steps=epochs * steps_per_epoch,
            warmup_steps=int(warmup_epochs * steps_per_epoch),
            start_value=start_value,
        )

    def values(self, steps: np.ndarray) -> np.ndarray:
        """The value at each (integer) step, vectorised; steps past the end hold the final value."""
        steps = np.asarray(steps, dtype=np.float64)
        out = np.empty_like(steps)
        warm = steps < self.warmup_steps
        if self.warmup_steps > 1:
            out[warm] = self.start_value + (self.base_value - self.start_value) * steps[warm] / (self.warmup_steps - 1)
        else:
            out[warm] = self.base_value
        decay_len = self.total_steps - self.warmup_steps
        progress = np.clip(steps[~warm] - self.warmup_steps, 0, decay_len) / max(decay_len, 1)
        out[~warm] = self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + np.cos(np.pi * progress))
        return out

    def __call__(self, step: int) -> float:
        return float(self.values(np.array([step]))[0])
