from kedro.pipeline import Node, Pipeline

from eva_pipeline.pipelines.student_config.nodes import resolve_student_config


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_student_config,
                inputs="params:pretrain",
                outputs="student_config",
                name="resolve_student_config",
            )
        ],
        tags=["student_config"],
    )
