"""Intermediate fine-tune (EVA's IN-21K stage): the pre-trained student on the broad label space."""

from eva_pipeline.pipelines.finetune_intermediate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
