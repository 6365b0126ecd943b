from kedro.pipeline import Node, Pipeline

from eva_pipeline.pipelines.ingestion.nodes import build_manifest


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_manifest,
                inputs="params:ingestion",
                outputs=["manifest", "ingestion_report"],
                name="build_manifest",
            )
        ],
        tags=["ingestion"],
    )
