from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.ingestion.nodes import build_manifest, class_names, source_metrics, source_table


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_manifest,
                inputs=["params:ingestion", "ingestion_scan_cache"],
                outputs=["manifest", "ingestion_report", "ingestion_rejections"],
                name="build_manifest",
                tags=[preflight.SOURCES],
            ),
            Node(class_names, inputs="ingestion_report", outputs="class_names", name="class_names"),
            Node(source_table, inputs="ingestion_report", outputs="ingestion_sources", name="source_table"),
            Node(source_metrics, inputs="ingestion_sources", outputs="ingestion_metrics", name="source_metrics"),
        ],
        tags=["ingestion"],
    )
