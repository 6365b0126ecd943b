from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.pipelines.video_ingestion.nodes import build_clip_manifest, generate_synthetic_clips


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                generate_synthetic_clips,
                inputs="params:video_ingestion",
                outputs="synthetic_video_summary",
                name="generate_synthetic_clips",
            ),
            Node(
                build_clip_manifest,
                inputs=["synthetic_video_summary", "params:video_ingestion"],
                outputs=["video_manifest", "video_rejections", "k722_class_mapping", "video_ingestion_report"],
                name="build_clip_manifest",
                tags=[preflight.VIDEO_SOURCES],
            ),
        ],
        tags=["video_ingestion"],
    )
