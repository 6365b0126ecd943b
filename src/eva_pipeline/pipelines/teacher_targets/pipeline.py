from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.teacher_targets.nodes import compute_teacher_targets


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                compute_teacher_targets,
                inputs=["manifest", "teacher_targets_store", "params:teacher_targets", "student_config"],
                outputs="teacher_targets",
                name="compute_teacher_targets",
                tags=[preflight.TEACHER],
            )
        ],
        tags=["teacher_targets"],
    )
