from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.train_student.nodes import draw_mask_examples, pretrain_student


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                draw_mask_examples,
                inputs=["manifest", "student_config"],
                outputs="mask_examples_plot",
                name="draw_mask_examples",
            ),
            Node(
                pretrain_student,
                inputs=[
                    "manifest",
                    "teacher_targets",
                    "pretrain_checkpoints",
                    "student_config",
                    "params:teacher_targets",
                ],
                outputs=["eva_student", "pretrain_history", "pretrain_summary", "pretrain_loss_plot"],
                name="pretrain_student",
                tags=[preflight.TRAINING],  # and the teacher when it runs online
            ),
        ],
        tags=["train_student"],
    )
