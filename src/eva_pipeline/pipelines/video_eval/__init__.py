"""Video evaluation: every target model on its version's held-out clips, 1 view vs 4 temporal clips x 3 crops."""

from eva_pipeline.pipelines.video_eval.pipeline import create_pipeline

__all__ = ["create_pipeline"]
