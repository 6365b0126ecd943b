"""Teacher targets: the frozen teacher's per-patch features of the pre-training images, stored once and reused."""

from eva_pipeline.pipelines.teacher_targets.pipeline import create_pipeline

__all__ = ["create_pipeline"]
