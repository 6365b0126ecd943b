"""Project pipelines.

``ingestion``, ``student_config``, ``teacher_targets``, ``train_student`` and ``evaluation`` each run one stage (one
DVC stage each); ``pretrain`` (also the default) runs all five in order: the full demo.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    if "pretrain" in pipelines:
        pipelines["__default__"] = pipelines["pretrain"]
    return pipelines
