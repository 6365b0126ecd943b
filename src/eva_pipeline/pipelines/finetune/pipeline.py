from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.finetune.nodes import finetune_target


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                finetune_target,
                inputs=[
                    "manifest",
                    "class_names",
                    "eva_student",
                    "eva_intermediate",
                    "student_config",
                    "finetune_checkpoints",
                    "params:finetune",
                ],
                outputs=["finetuned_models", "finetune_history", "finetune_summary", "finetune_loss_plot"],
                name="finetune_target",
                tags=[preflight.FINETUNE],
            ),
        ],
        tags=["finetune"],
    )
