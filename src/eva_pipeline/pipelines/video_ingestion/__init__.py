"""Video ingestion: the Kinetics versions (or the demo's generated Moving Fashion-MNIST) -> one clip manifest with
Kinetics-722, and the K722 -> version class mapping."""

from eva_pipeline.pipelines.video_ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
