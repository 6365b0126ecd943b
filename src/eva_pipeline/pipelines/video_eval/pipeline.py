from kedro.pipeline import Node, Pipeline

from eva_pipeline.pipelines.video_eval.nodes import evaluate_video


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_video,
                inputs=[
                    "video_manifest",
                    "k722_class_mapping",
                    "finetuned_video_models",
                    "params:video_eval",
                    "params:finetune_video",
                ],
                outputs=["video_metrics", "video_table", "video_per_class_plots", "video_metrics_mlflow"],
                name="evaluate_video",
            ),
        ],
        tags=["video_eval"],
    )
