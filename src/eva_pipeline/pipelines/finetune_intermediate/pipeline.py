from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.finetune_intermediate.nodes import finetune_intermediate


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                finetune_intermediate,
                inputs=[
                    "manifest",
                    "class_names",
                    "eva_student",
                    "student_config",
                    "intermediate_checkpoints",
                    "params:finetune_intermediate",
                ],
                outputs=["eva_intermediate", "intermediate_history", "intermediate_summary", "intermediate_loss_plot"],
                name="finetune_intermediate",
                tags=[preflight.FINETUNE],
            ),
        ],
        tags=["finetune_intermediate"],
    )
