"""The K400/K600/K700 video fine-tunes: each K722 model on each target version, its head rows by class mapping."""

from eva_pipeline.pipelines.finetune_video.pipeline import create_pipeline

__all__ = ["create_pipeline"]
