from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.evaluation.nodes import linear_probe, plot_probe


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                linear_probe,
                inputs=[
                    "manifest",
                    "eva_student",
                    "params:evaluation",
                    "student_config",
                    "params:teacher_targets",
                ],
                outputs=["probe_metrics", "probe_metrics_mlflow"],
                name="linear_probe",
                tags=[preflight.TEACHER],  # the teacher's features are a probe row
            ),
            Node(plot_probe, inputs="probe_metrics", outputs="probe_plot", name="plot_probe"),
        ],
        tags=["evaluation"],
    )
