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


def report_step(
    bar: Any, metrics_fn: MetricsFn | None, record: dict[str, float], log_every_steps: int, last_step: int
) -> None:
    """Rank 0: advance the progress bar; hand the record to ``metrics_fn`` every ``log_every_steps`` steps, at the
    last step and whenever it carries a validation result (``val_*``)."""
    step = int(record["step"])
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_second']:.0f}")
    due = step % log_every_steps == 0 or step == last_step or any(k.startswith("val_") for k in record)
    if metrics_fn is not None and due:
        metrics_fn(step, {k: v for k, v in record.items() if k != "step"})  # the step is the x-axis
