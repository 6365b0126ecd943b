from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.classification_eval.nodes import evaluate_classifiers


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_classifiers,
                inputs=["manifest", "class_names", "finetuned_models", "params:classification_eval", "params:finetune"],
                outputs=[
                    "classification_metrics",
                    "classification_table",
                    "classification_plot",
                    "classification_metrics_mlflow",
                ],
                name="evaluate_classifiers",
                tags=[preflight.CLASSIFICATION],
            ),
        ],
        tags=["classification_eval"],
    )
