"""The per-step records of a whole run, kept next to its checkpoints so that a resumed run's curve is whole."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eva_pipeline.fileio import replace_atomically

RUN_HISTORY_FILE = "history.jsonl"

MetricsFn = Callable[[int, dict[str, float]], None]
"""(1-based step, the step's record without ``step``) -> None: e.g. an MLflow logger."""


class RunHistory:
    """The per-step records of a whole run, kept next to its checkpoints (JSON lines, rank 0).

    A resumed run first drops the records after the checkpoint it resumed from (a crashed run logged steps that its
    checkpoint does not contain), then appends; so the file always describes the trajectory that led to the current
    weights, however many times the run was interrupted or rolled back, and the loss curve of a resumed run is whole.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self._fh = None

    def truncate(self, step: int) -> None:
        """Keep the records of steps <= ``step`` (none for 0); written atomically."""
        if not self.enabled:
            return
        self.close()
        kept = [r for r in self.read() if r["step"] <= step] if step > 0 else []
        text = "".join(json.dumps(r) + "\n" for r in kept)
        replace_atomically(self.path, lambda tmp: tmp.write_text(text))

    def append(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._fh = self.path.open("a")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def read(self) -> list[dict[str, float]]:
        if not self.enabled:
            return []
        self.close()
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: the rest is intact
                continue
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class StepReport:
    """Rank 0's per-step output: the progress bar at every step, and for ``metrics_fn`` (e.g. an MLflow logger) the
    records due every ``log_every_steps`` steps, at the last step and whenever one carries a validation result
    (``val_*``).

    A record reaches ``metrics_fn`` once a checkpoint holds its step (:meth:`commit`, and at :meth:`close` the rest),
    never before: a non-finite rollback (:meth:`discard`) or a crash only loses records that nothing logged, so a
    run's metrics hold every step once and none of discarded work. A resumed run first logs the records of the steps
    it resumes from (:meth:`start`, from its :class:`RunHistory`), so the run that finishes holds steps 1..N even when
    it only ran the last ones, or none. ``metrics_fn`` may offer ``log_steps(pairs)`` (many steps in a few requests) and
    ``started(training_id, resumed_from_step)`` (told once, before anything is logged).
    """

    def __init__(self, bar: Any, metrics_fn: MetricsFn | None, log_every_steps: int, last_step: int) -> None:
        self.bar, self.metrics_fn = bar, metrics_fn
        self.log_every_steps, self.last_step = log_every_steps, last_step
        self._pending: list[tuple[int, dict[str, float]]] = []

    def due(self, record: dict[str, float]) -> bool:
        step = int(record["step"])
        return step % self.log_every_steps == 0 or step == self.last_step or any(k.startswith("val_") for k in record)

    def start(self, training_id: str, start_step: int, resumed: list[dict[str, float]]) -> None:
        """Tell ``metrics_fn`` which training this is, then log the due records of ``resumed`` (steps <= start)."""
        started = getattr(self.metrics_fn, "started", None)
        if started is not None:
            started(training_id, start_step)
        self._hand_over([r for r in resumed if int(r["step"]) <= start_step and self.due(r)])

    def step(self, record: dict[str, float]) -> None:
        """A step was taken: advance the bar; keep the record for ``metrics_fn`` if due."""
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_second']:.0f}"
        )
        if self.metrics_fn is not None and self.due(record):
            self._pending.append(record)

    def commit(self, step: int) -> None:
        """A checkpoint now holds the steps up to ``step``: hand their records over."""
        ready = [r for r in self._pending if int(r["step"]) <= step]
        self._pending = [r for r in self._pending if int(r["step"]) > step]
        self._hand_over(ready)

    def discard(self, after: int) -> None:
        """Rolled back to the checkpoint of step ``after``: the records of later steps never happened."""
        self._pending = [r for r in self._pending if int(r["step"]) <= after]

    def close(self) -> None:
        """The run ended here: the state it returns holds every step taken."""
        ready, self._pending = self._pending, []
        self._hand_over(ready)
        self.bar.close()

    def _hand_over(self, records: list[dict[str, float]]) -> None:
        if self.metrics_fn is None or not records:
            return
        pairs = [(int(r["step"]), {k: v for k, v in r.items() if k != "step"}) for r in records]  # step: the x-axis
        log_steps = getattr(self.metrics_fn, "log_steps", None)
        if log_steps is not None:
            log_steps(pairs)
        else:
            for step, metrics in pairs:
                self.metrics_fn(step, metrics)
