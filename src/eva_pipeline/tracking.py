"""MLflow records that survive restarts and read well: step metrics from rank 0 into a run opened elsewhere, the
tags that link the runs of one training or one ``dvc repro``, runs of dead processes closed, models registered.

Kedro-mlflow opens one run per ``kedro run``; training code logs per-step metrics into it by run id and never
starts or ends that run itself. Names follow one scheme: a metric is ``<block>/<name>`` (``<block>``: the parameter
block of the stage that logs it, ``pretrain/loss``, ``finetune/student/val_top1``, ``classification_eval/student/
val/top1``), a param ``<block>.<field>...`` (``pretrain.optimizer.lr``), a tag of this project ``eva.<what>``.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import psutil
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

#: The experiment tag that MLflow's UI reads for the kind of an experiment, and the value of classic model training
#: ("Machine learning"; the other kind, ``genai_development``, opens on traces). MLflow 3.17 exports no Python
#: constant for either: the values are the UI's ``ExperimentKind`` enum (``mlflow/server/js``) and those its
#: onboarding skill checks (``mlflow/assistant/skills/mlflow-onboarding``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
#: MLflow's tag for nesting a run under another in the UI.
PARENT_RUN_TAG = "mlflow.parentRunId"

#: Where the process that logs into a run lives: a RUNNING run whose process is gone is closed at the next start.
HOST_TAG, PID_TAG, PID_STARTED_TAG = "eva.host", "eva.pid", "eva.pid_started"
CLOSED_BY_TAG = "eva.closed_by"
#: ``eva.training.<stage>``: the training's id (the checkpoint folder it resumes from), the same in every run of it.
TRAINING_TAG = "eva.training."
RESUMED_TAG = "eva.resumed_from_step."
#: The stage runs of one ``dvc repro`` share this tag and sit under one parent run (``eva.role`` ``dvc_repro``).
DVC_REPRO_TAG, DVC_STAGE_TAG, ROLE_TAG = "eva.dvc_repro", "eva.dvc_stage", "eva.role"

_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def metric_key(*parts: str) -> str:
    """``<block>/<name>``: the one separator of every metric name (``metric_key("pretrain", "loss")``)."""
    return "/".join(p.strip("/") for p in parts if p)


class MlflowStepLogger:
    """Callable ``(step, metrics)`` that logs ``prefix<name>`` metrics into an existing run, batched per call.

    ``prefix``: the stage's part of the name, ending in ``/`` (``pretrain/``, ``finetune/student/``). Only rank 0
    logs. :meth:`log_steps` logs many steps in a few calls (a resumed run's replayed history); :meth:`started` tags
    the run with the training it continues, so that the runs of one training can be found together.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, prefix: str = "", rank: int = 0) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.prefix = prefix
        self.rank = rank
        self._client = MlflowClient(tracking_uri) if rank == 0 else None

    @property
    def stage(self) -> str:
        """The prefix without its trailing ``/``: the training tags' stage (``pretrain``, ``finetune/student``)."""
        return self.prefix.rstrip("/") or "train"

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_steps([(step, metrics)])

    def log_steps(self, steps: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Log ``(step, metrics)`` pairs, up to 1,000 metrics per request."""
        if self._client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(f"{self.prefix}{k}", float(v), now, int(step)) for step, m in steps for k, v in m.items()]
        for start in range(0, len(batch), _BATCH):
            self._client.log_batch(self.run_id, metrics=batch[start : start + _BATCH])

    def started(self, training_id: str, resumed_from_step: int) -> None:
        """Tag the run with the training it runs (``eva.training.<stage>``) and the step it resumed from."""
        if self._client is None:
            return
        self._client.set_tag(self.run_id, f"{TRAINING_TAG}{self.stage}", training_id)
        self._client.set_tag(self.run_id, f"{RESUMED_TAG}{self.stage}", str(resumed_from_step))


def active_run_logger(prefix: str = "") -> MlflowStepLogger | None:
    """A step logger for the MLflow run active in this process (kedro-mlflow's), or None when tracking is off."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    return MlflowStepLogger(run.info.run_id, mlflow.get_tracking_uri(), prefix=prefix)


def training_runs(client: MlflowClient, experiment_id: str, stage: str, training_id: str) -> list[Any]:
    """Every run of one training (``stage``, its id), oldest first: the attempts of a training that was restarted."""
    runs = client.search_runs([experiment_id], f"tags.`{TRAINING_TAG}{stage}` = '{training_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


# ------------------------------------------------------------------------------------------------ run hygiene
def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that identify the process logging into a run: host, pid and the pid's start time."""
    process = psutil.Process(pid)
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(process.pid), PID_STARTED_TAG: repr(process.create_time())}


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process the tags name (:func:`process_tags`) still runs on this host; a reused pid is not it."""
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        alive = process.status() != psutil.STATUS_ZOMBIE
        return alive and abs(process.create_time() - float(tags[PID_STARTED_TAG])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def close_dead_runs(client: MlflowClient, experiment_id: str, closed_by: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process died (killed, crashed, out of memory): a run that its
    own process could not end would otherwise stay RUNNING forever. Runs of other hosts are left alone (their
    processes cannot be seen from here). -> the ids closed, each tagged ``eva.closed_by`` ``closed_by``."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'", max_results=1000
    )
    closed = []
    for run in running:
        if run.info.run_id == closed_by or process_alive(run.data.tags):
            continue
        client.set_tag(run.info.run_id, CLOSED_BY_TAG, closed_by)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        closed.append(run.info.run_id)
    return closed


def mark_model_development(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training (MLflow UI: "Machine learning", runs first) unless it has a kind."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)


def dvc_repro_id(environ: Mapping[str, str] | None = None) -> str | None:
    """An id shared by the stage commands of one ``dvc repro`` (or ``dvc exp run``), None outside DVC.

    DVC runs each stage's command with ``DVC_STAGE`` set; the nearest ancestor without it is the DVC process, the
    same for every stage of one invocation: its host, pid and start time make the id.
    """
    environ = os.environ if environ is None else environ
    if "DVC_STAGE" not in environ:
        return None
    for parent in psutil.Process().parents():
        try:
            if "DVC_STAGE" in parent.environ():
                continue
            return f"{socket.gethostname()}:{parent.pid}:{parent.create_time():.0f}"
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


def join_dvc_repro(client: MlflowClient, run_id: str, experiment_id: str, repro_id: str, stage: str) -> str:
    """Nest a stage's run under the parent run of its ``dvc repro`` (created by the first stage), both tagged
    ``eva.dvc_repro``; -> the parent's id. The parent holds no metrics: it is FINISHED, its end the latest stage's
    start."""
    found = client.search_runs(
        [experiment_id], f"tags.`{DVC_REPRO_TAG}` = '{repro_id}' and tags.`{ROLE_TAG}` = 'dvc_repro'", max_results=1
    )
    if found:
        parent_id = found[0].info.run_id
    else:
        name = time.strftime("dvc repro %Y-%m-%d %H:%M:%S")
        tags = {DVC_REPRO_TAG: repro_id, ROLE_TAG: "dvc_repro"}
        parent_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))
    for key, value in {DVC_REPRO_TAG: repro_id, DVC_STAGE_TAG: stage, PARENT_RUN_TAG: parent_id}.items():
        client.set_tag(run_id, key, value)
    return parent_id


# ------------------------------------------------------------------------------------------------ models
def pip_requirements(distributions: Sequence[str] = ("torch",)) -> list[str]:
    """Pinned requirements of a logged model from this environment's metadata (no network, no inference run)."""
    out = []
    for name in distributions:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_torch_model(
    model: Any,
    input_example: np.ndarray,
    *,
    name: str,
    registered_name: str,
    run_id: str,
    step: int = 0,
    tags: Mapping[str, str] | None = None,
    max_example_values: int = 1_000_000,
) -> Any:
    """Log ``model`` (an ``nn.Module`` taking one float tensor) with ``mlflow.pytorch`` into run ``run_id`` and
    register it as a new version of ``registered_name``; -> MLflow's ``ModelInfo``.

    Stored as a ``torch.export`` program (MLflow's ``pt2``, its default outside Databricks), traced on
    ``input_example``: it loads with torch alone, without this project's code or a pickle, and takes any batch size
    when the example's batch is 2 or more (``torch.export`` fixes a dimension of size 1).

    The signature comes from the model's output on ``input_example``, which is stored with it unless it has more
    than ``max_example_values`` values (EVA-g's clips: the model is then pickled, and loads with this project
    installed); the requirements are pinned from this environment (no pip inference, which would import the model in
    a subprocess). ``step``: the run's metrics at that step (the training's last) are linked to the logged model.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    stored = input_example.size <= max_example_values
    return mlflow.pytorch.log_model(
        model,
        name=name,
        signature=infer_signature(input_example, output),
        input_example=input_example if stored else None,
        pip_requirements=pip_requirements() if stored else pip_requirements(("torch", "eva_pipeline")),
        registered_model_name=registered_name,
        serialization_format="pt2" if stored else "pickle",
        step=step,
        tags=dict(tags or {}),
        run_id=run_id,  # Model.log's: the run need not be the active one
    )
