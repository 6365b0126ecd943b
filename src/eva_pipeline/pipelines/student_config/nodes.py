"""The one node that reads the ``pretrain`` parameter block."""

from __future__ import annotations

from eva_pipeline.config import PretrainParams


def resolve_student_config(params: PretrainParams) -> PretrainParams:
    """The student's settings as every later stage uses them: the ``pretrain`` block validated (Kedro checks it
    against :class:`~eva_pipeline.config.PretrainParams` before any node runs) with every default filled in.

    Saved by the ``student_config`` dataset (YAML, an MLflow artifact of the run) and read from there by the
    teacher_targets, train_student and evaluation nodes: one record of the configuration the targets were made for,
    the student was trained with and the probe rebuilds.
    """
    return params
