"""MLflow logging that is safe with several ranks: only rank 0 writes, into a run opened elsewhere.

Kedro-mlflow opens one run per ``kedro run``; training code logs per-step metrics into it by run id and never
starts or ends runs itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class MlflowStepLogger:
    """Callable ``(step, metrics)`` that logs ``prefix/<name>`` metrics into an existing run, batched per call."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, prefix: str = "", rank: int = 0) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.prefix = prefix
        self.rank = rank
        self._client = MlflowClient(tracking_uri) if rank == 0 else None

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(f"{self.prefix}{k}", float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)


def active_run_logger(prefix: str = "") -> MlflowStepLogger | None:
    """A step logger for the MLflow run active in this process (kedro-mlflow's), or None when tracking is off."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    return MlflowStepLogger(run.info.run_id, mlflow.get_tracking_uri(), prefix=prefix)
