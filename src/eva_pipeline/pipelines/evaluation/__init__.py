"""Evaluation: linear probe of frozen features on the held-out labelled split."""

from eva_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
