from kedro.pipeline import Node, Pipeline

from eva_pipeline.pipelines.train_student.nodes import draw_mask_examples, pretrain_student, resolve_run_config


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_run_config,
                inputs=["params:pretrain", "params:teacher_targets"],
                outputs="resolved_config",
                name="resolve_run_config",
            ),
            Node(
                draw_mask_examples,
                inputs=["manifest", "params:pretrain"],
                outputs="mask_examples_plot",
                name="draw_mask_examples",
            ),
            Node(
                pretrain_student,
                inputs=[
                    "manifest",
                    "teacher_targets",
                    "pretrain_checkpoints",
                    "params:pretrain",
                    "params:teacher_targets",
                ],
                outputs=["eva_student", "pretrain_history", "pretrain_summary", "pretrain_loss_plot"],
                name="pretrain_student",
            ),
        ],
        tags=["train_student"],
    )
