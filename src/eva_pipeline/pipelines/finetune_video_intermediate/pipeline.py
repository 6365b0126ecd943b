from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.finetune_video_intermediate.nodes import finetune_video_intermediate


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                finetune_video_intermediate,
                inputs=[
                    "video_manifest",
                    "k722_class_mapping",
                    "eva_student",
                    "eva_intermediate",
                    "student_config",
                    "video_intermediate_checkpoints",
                    "params:finetune_video_intermediate",
                ],
                outputs=[
                    "video_intermediate_models",
                    "video_intermediate_history",
                    "video_intermediate_summary",
                    "video_intermediate_loss_plot",
                ],
                name="finetune_video_intermediate",
                tags=[preflight.FINETUNE],
            ),
        ],
        tags=["finetune_video_intermediate"],
    )
