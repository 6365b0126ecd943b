from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.finetune_video.nodes import finetune_video_targets


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                finetune_video_targets,
                inputs=[
                    "video_manifest",
                    "k722_class_mapping",
                    "video_intermediate_models",
                    "student_config",
                    "finetune_video_checkpoints",
                    "params:finetune_video",
                ],
                outputs=[
                    "finetuned_video_models",
                    "finetune_video_history",
                    "finetune_video_summary",
                    "finetune_video_loss_plot",
                ],
                name="finetune_video_targets",
                tags=[preflight.FINETUNE],
            ),
        ],
        tags=["finetune_video"],
    )
