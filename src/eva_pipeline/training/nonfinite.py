"""What the loop does when steps keep coming out non-finite: count them, roll back, and stop with advice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training kept producing non-finite losses or gradients even after rolling back; the message says what to try."""


@dataclass
class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; asks for a rollback after ``max_consecutive_skips``.

    DeepSpeed already skips a step whose gradients are not finite (and lowers the fp16 loss scale); a run that keeps
    skipping is stuck, so it is rolled back to the last checkpoint, at most ``max_rollbacks`` times. (The public EVA
    code's equivalent path reloads a checkpoint it never saved.)
    """

    max_consecutive_skips: int
    max_rollbacks: int
    consecutive: int = 0
    rollbacks: int = 0

    def observe(self, applied: bool) -> bool:
        """Record one step; True when the caller must roll back now."""
        self.consecutive = 0 if applied else self.consecutive + 1
        if self.consecutive < self.max_consecutive_skips:
            return False
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive non-finite steps after {self.rollbacks} rollback(s): training is "
                f"stuck. Lower pretrain.optimizer.lr, use precision bf16 instead of fp16, or check the inputs and "
                f"teacher targets for NaN/inf; the last good checkpoint is kept"
            )
        self.consecutive = 0
        self.rollbacks += 1
        return True


def roll_back(
    guard: NonFiniteGuard, step: int, has_checkpoint: bool, restore: Callable[[], int], *, every_steps: str, advice: str
) -> int:
    """Restore the latest checkpoint (``restore()`` returns its step) after the guard's run of non-finite steps
    ending at ``step`` (0-based); without a checkpoint to go back to, stop with ``advice``. ``every_steps``: the
    setting that says how often checkpoints are written, as the message shows it (``name=value``)."""
    if not has_checkpoint:
        raise NonFiniteTrainingError(
            f"{guard.max_consecutive_skips} consecutive non-finite steps at step {step + 1}, before the first "
            f"checkpoint ({every_steps}): nothing to roll back to. {advice}"
        )
    restored = restore()
    log.warning(
        "%d consecutive non-finite steps at step %d: rolled back to the checkpoint of step %d (rollback %d/%d)",
        guard.max_consecutive_skips,
        step + 1,
        restored,
        guard.rollbacks,
        guard.max_rollbacks,
    )
    return restored
