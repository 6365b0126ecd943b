"""Project pipelines.

``ingestion``, ``student_config``, ``teacher_targets``, ``train_student``, ``evaluation``, ``finetune_intermediate``,
``finetune``, ``classification_eval``, ``video_ingestion``, ``finetune_video_intermediate``, ``finetune_video`` and
``video_eval`` each run one stage (one DVC stage each); ``pretrain`` runs the first five (pre-training and its probe)
and the default runs the whole DAG: pre-training, then image and video fine-tuning and evaluation.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: The stages, in the order the DAG runs them (one DVC stage each); ``pretrain`` is the first five.
STAGES: tuple[str, ...] = (
    "ingestion",
    "student_config",
    "teacher_targets",
    "train_student",
    "evaluation",
    "finetune_intermediate",
    "finetune",
    "classification_eval",
    "video_ingestion",
    "finetune_video_intermediate",
    "finetune_video",
    "video_eval",
)


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    if all(name in pipelines for name in STAGES):  # Kedro loads only the requested pipelines when it can
        pipelines["__default__"] = sum((pipelines[name] for name in STAGES), Pipeline([]))
    return pipelines
