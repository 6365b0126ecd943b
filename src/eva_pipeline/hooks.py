"""Kedro hooks: pre-flight checks before a pipeline runs; the MLflow record (kedro-mlflow's run, with readable
params, the tags that link restarts and ``dvc repro`` stages, runs of dead processes closed, models registered); the
result tables and plots printed at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook
from pydantic import BaseModel

from eva_pipeline.config import PARAMETER_BLOCKS

_MLFLOW_PARAM_MAX_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MLFLOW_BATCH = 100  # params per log_batch call
#: Datasets that hold a resolved parameter block, logged as that block's params (``pretrain.optimizer.lr``) by the
#: nodes that read them, so that a run of later stages alone (``--pipelines train_student``) records them too.
PARAMETER_DATASETS = {"student_config": "pretrain"}


#: The parameter blocks the pre-flight checks read, with their models.
_BLOCKS: dict[str, type[BaseModel]] = PARAMETER_BLOCKS


class PreflightHook:
    """Refuses to start a run that would fail later for want of data, weights or a GPU; nothing is written.

    The checks are those the pipeline's nodes need (``eva_pipeline.preflight.select_checks``: by their tags and
    the datasets they consume, the same selection as the dry run's; a fine-tune stage by the block its node reads),
    so ``--pipelines evaluation`` or ``--from-nodes ...`` checks only what that slice needs. ``tryfirst``: runs
    before kedro-mlflow's ``before_pipeline_run``, so a refused run leaves no MLflow run behind.
    """

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from eva_pipeline import preflight  # torch-heavy: only when a pipeline really runs

        blocks: dict[str, BaseModel] = {}

        def block(name: str) -> BaseModel:
            if name not in blocks:
                blocks[name] = _BLOCKS[name].model_validate(catalog.load(f"params:{name}"))
            return blocks[name]

        checks = preflight.select_checks(pipeline.nodes)
        problems = preflight.run_checks(
            checks, block, run_params.get("runtime_params"), finetune=preflight.finetune_blocks(pipeline.nodes)
        )
        preflight.raise_if_problems(problems)


def flatten_params(prefix: str, value: Any, sep: str = ".") -> dict[str, Any]:
    """``{"pretrain.optimizer.lr": 1e-3, ...}``: dicts and lists of dicts flattened (list items by index)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, (dict, BaseModel)) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten_params(f"{prefix}{sep}{key}", item, sep))
    return flat


class MlflowRunHook:
    """Two fixes around kedro-mlflow's run handling (the run itself is kedro-mlflow's).

    * Typed parameters: each field of a pydantic ``params:`` input is logged as its own MLflow param
      (``pretrain.optimizer.lr``). kedro-mlflow flattens only plain dicts; a validated parameter block reaches the
      nodes as a pydantic model, which it logs as one truncated string. The same for a dataset holding a resolved
      block (:data:`PARAMETER_DATASETS`: ``student_config`` is logged as ``pretrain.*``). ``trylast``: after
      kedro-mlflow has re-opened the run for the node.
    * Closing the run: kedro-mlflow re-opens its run before every node, and MLflow 3 stacks a run re-opened with
      ``nested=True`` once more each time, so its single ``end_run()`` leaves the run active in this process. A second
      session in the same process (a notebook, a test) would then log into the first one's run. ``trylast`` after a
      pipeline: end what is left of a run that kedro-mlflow opened (a run active before the session is left alone).
    """

    def __init__(self) -> None:
        self._logged: set[tuple[str, str]] = set()
        self._outer_run_id: str | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self) -> None:
        import mlflow

        outer = mlflow.active_run()
        self._outer_run_id = None if outer is None else outer.info.run_id

    @hook_impl(trylast=True)
    def before_node_run(self, inputs: dict[str, Any]) -> None:
        typed = {
            k[len("params:") :]: v for k, v in inputs.items() if k.startswith("params:") and isinstance(v, BaseModel)
        }
        typed.update({PARAMETER_DATASETS[k]: v for k, v in inputs.items() if k in PARAMETER_DATASETS})
        if not typed:
            return
        import mlflow

        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        params: dict[str, str] = {}
        for name, value in typed.items():
            if (run.info.run_id, name) in self._logged:
                continue
            self._logged.add((run.info.run_id, name))
            params.update({k: str(v)[:_MLFLOW_PARAM_MAX_LENGTH] for k, v in flatten_params(name, value).items()})
        items = sorted(params.items())
        for start in range(0, len(items), _MLFLOW_BATCH):
            mlflow.log_params(dict(items[start : start + _MLFLOW_BATCH]))

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._end_leftover_runs("FINISHED")

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        self._end_leftover_runs("FAILED")

    def _end_leftover_runs(self, status: str) -> None:
        import mlflow

        if self._outer_run_id is not None:
            return
        while mlflow.active_run() is not None:
            mlflow.end_run(status)


class ProjectMlflowHook(MlflowHook):
    """kedro-mlflow's hook (registered in its place: settings ``DISABLE_HOOKS_FOR_PLUGINS``) with what this project
    adds to the run it opens.

    * A pydantic ``params:`` input is not logged as one object dump (``sources=[SourceParams(...)]``):
      :class:`MlflowRunHook` logs its fields one by one (``ingestion.sources.0.limit``).
    * At the start of a run: the experiment tagged as model training (``mlflow.experimentKind``), the run tagged with
      its process (host, pid), the RUNNING runs of dead processes on this host marked KILLED
      (:func:`~eva_pipeline.tracking.close_dead_runs`), and under ``dvc repro`` the run nested with the other stages
      of the same invocation under one parent run (:func:`~eva_pipeline.tracking.join_dvc_repro`).
    """

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> None:
        plain = {k: v for k, v in inputs.items() if not isinstance(v, BaseModel)}
        super().before_node_run(node=node, catalog=catalog, inputs=plain, is_async=is_async)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        super().before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        import os

        import mlflow

        from eva_pipeline import tracking

        run = mlflow.active_run()
        if not self._is_mlflow_enabled or run is None:
            return
        client = mlflow.MlflowClient()
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        tracking.mark_model_development(client, experiment_id)
        for key, value in tracking.process_tags().items():
            client.set_tag(run_id, key, value)
        tracking.close_dead_runs(client, experiment_id, closed_by=run_id)
        repro = tracking.dvc_repro_id()
        if repro is not None:
            tracking.join_dvc_repro(client, run_id, experiment_id, repro, os.environ["DVC_STAGE"])


@dataclass(frozen=True)
class ModelOutput:
    """A catalog dataset of trained weights, logged as an MLflow model: its registered name and the metric prefix
    of its training (``{part}``: the partition of a folder dataset, one model per run)."""

    registered_name: str
    metric_prefix: str


#: The weights logged and registered as MLflow models when a run saves them.
MODEL_OUTPUTS = {
    "eva_student": ModelOutput("eva-student", "pretrain"),
    "eva_intermediate": ModelOutput("eva-intermediate", "finetune_intermediate"),
    "finetuned_models": ModelOutput("eva-finetune-{part}", "finetune/{part}"),
    "video_intermediate_models": ModelOutput("eva-video-intermediate-{part}", "finetune_video_intermediate/{part}"),
    "finetuned_video_models": ModelOutput("eva-finetune-video-{part}", "finetune_video/{part}"),
}


class MlflowModelHook:
    """Logs the weights a run saves (:data:`MODEL_OUTPUTS`) as MLflow models (``mlflow.pytorch``, with signature and
    input example) in the run, registered under stable names; the run's metrics at the training's last step are
    linked to the model.

    The model is rebuilt from what the catalog reads back, so that it is the weights file exactly (the student's
    fp16 weights included); the student is logged as :class:`~eva_pipeline.models.EvaTokens` (images -> tokens), a
    classifier as itself (images or clips -> logits, the EMA weights when kept, as released).
    """

    def __init__(self) -> None:
        self._catalog: Any = None

    @hook_impl
    def before_pipeline_run(self, catalog: Any) -> None:
        self._catalog = catalog

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        output = MODEL_OUTPUTS.get(dataset_name)
        if output is None or self._catalog is None:
            return
        import mlflow

        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        stored = self._catalog.load(dataset_name)
        if isinstance(data, dict):  # a folder of models: the partitions this node saved
            for part in sorted(data):
                self._log(run.info.run_id, dataset_name, output, _model_from(stored[part]()), part)
        else:
            self._log(run.info.run_id, dataset_name, output, _model_from(stored, data), None)

    def _log(self, run_id: str, dataset: str, output: ModelOutput, model: Any, part: str | None) -> None:
        import mlflow

        from eva_pipeline import tracking

        fill = {"part": part or ""}
        prefix = output.metric_prefix.format(**fill)
        history = mlflow.MlflowClient().get_metric_history(run_id, tracking.metric_key(prefix, "loss"))
        tracking.log_torch_model(
            model,
            _input_example(model),
            name=output.registered_name.format(**fill),
            registered_name=output.registered_name.format(**fill),
            run_id=run_id,
            step=max((m.step for m in history), default=0),
            tags={"eva.dataset": dataset, "eva.metric_prefix": prefix},
        )


def _model_from(stored: Any, saved: Any = None) -> Any:
    """The module to log from what the catalog read back: a classifier checkpoint's classifier, or the student
    (``saved``, the module the node returned, gives the architecture; ``stored`` its weights)."""
    from eva_pipeline.models import ClassifierCheckpoint, EvaMIM, EvaTokens, load_official_checkpoint

    if isinstance(stored, ClassifierCheckpoint):
        return stored.classifier()
    student = EvaMIM(saved.config, initialise=False)
    load_official_checkpoint(student, stored)
    return EvaTokens(student).eval()


def _input_example(model: Any) -> np.ndarray:
    """Two inputs of the shape the model takes (images, or clips of its frames), fixed values in [0, 1): a batch of 2
    keeps the exported model's batch size free."""
    config = getattr(model, "config", None) or model.student.config
    shape = [2, config.in_chans, config.img_size, config.img_size]
    if getattr(model, "video", None):
        shape.insert(2, model.video["num_frames"])
    return np.random.default_rng(0).random(shape, dtype=np.float32)


#: Datasets printed when a run that wrote them ends: name -> (title, how its loaded value becomes markdown).
RESULT_TABLES: dict[str, tuple[str, str]] = {
    "probe_metrics": ("Linear probe on held-out images", "probe"),
    "classification_table": ("Fine-tuning: the classification table", "markdown"),
    "video_table": ("Video fine-tuning: 1x1 and multi-view top-1", "markdown"),
}
#: Where the catalog writes reports and plots (Kedro's data-layer convention), relative to the project.
REPORTING_FOLDER = "data/08_reporting"


class RunSummaryHook:
    """At the end of a run: its result tables (those of the datasets this run wrote) and the plots it wrote, printed,
    so that ``make pretrain`` ends with its result rather than a path to find."""

    def __init__(self) -> None:
        self._started = 0.0

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import time

        self._started = time.time()

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from pathlib import Path

        from eva_pipeline.evaluation.summary import files_written_since, probe_markdown, run_summary

        written = pipeline.all_outputs()
        tables = {}
        for name, (title, kind) in RESULT_TABLES.items():
            if name in written:
                value = catalog.load(name)
                tables[title] = probe_markdown(value) if kind == "probe" else str(value)
        project = Path(run_params.get("project_path") or ".")
        figures = files_written_since(project / REPORTING_FOLDER, self._started)
        text = run_summary(tables, figures, relative_to=project)
        if text:
            print("\n" + text, flush=True)
