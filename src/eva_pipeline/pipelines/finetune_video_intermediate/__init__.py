"""The K722 video fine-tune (EVA's intermediate video stage): one space-time classifier per start."""

from eva_pipeline.pipelines.finetune_video_intermediate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
