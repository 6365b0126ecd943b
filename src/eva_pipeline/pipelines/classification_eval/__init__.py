"""Classification evaluation: every fine-tuned run on the target set and the robustness sets."""

from eva_pipeline.pipelines.classification_eval.pipeline import create_pipeline

__all__ = ["create_pipeline"]
