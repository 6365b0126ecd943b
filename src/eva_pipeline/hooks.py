"""Kedro hooks: pre-flight checks before a pipeline runs; MLflow params of typed blocks and run closing; the result
tables and plots printed at the end of a run."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl
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
