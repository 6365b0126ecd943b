"""Student pre-training: DeepSpeed training of the EVA student against the teacher's targets."""

from eva_pipeline.pipelines.train_student.pipeline import create_pipeline

__all__ = ["create_pipeline"]
