"""Kedro hooks: pre-flight checks before a pipeline runs."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams


def _params(catalog: Any, name: str, model: type) -> Any:
    return model.model_validate(catalog.load(f"params:{name}"))


class PreflightHook:
    """Refuses to start a run that would fail later for want of data, weights or a GPU; nothing is written."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from eva_pipeline import preflight  # torch-heavy: only when a pipeline really runs

        nodes = {node.name for node in pipeline.nodes}
        problems: list[str] = []
        if "build_manifest" in nodes:
            problems += preflight.check_sources(_params(catalog, "ingestion", IngestionParams))
        needs_teacher = bool({"compute_teacher_targets", "linear_probe"} & nodes)
        if "pretrain_student" in nodes:
            pretrain = _params(catalog, "pretrain", PretrainParams)
            problems += preflight.check_model(pretrain)
            problems += preflight.check_device(pretrain.device, pretrain.precision, "pretrain")
            problems += preflight.check_world_size(pretrain)
            teacher = _params(catalog, "teacher_targets", TeacherTargetsParams)
            problems += preflight.check_augmentation(pretrain, teacher)
            needs_teacher = needs_teacher or teacher.mode == "online"
        if needs_teacher:
            teacher = _params(catalog, "teacher_targets", TeacherTargetsParams)
            problems += preflight.check_teacher(teacher)
            problems += preflight.check_device(teacher.device, what="teacher_targets")
        preflight.raise_if_problems(problems)
