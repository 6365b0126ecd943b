"""Target fine-tune (EVA's IN-1K stage): one classifier per start (intermediate, student, random), same budget."""

from eva_pipeline.pipelines.finetune.pipeline import create_pipeline

__all__ = ["create_pipeline"]
