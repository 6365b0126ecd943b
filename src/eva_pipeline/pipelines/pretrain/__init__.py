"""The full demo: ingestion -> student_config -> teacher_targets -> train_student -> evaluation, as one pipeline.

A package of its own because Kedro loads only the requested pipeline packages (``kedro run --pipeline pretrain``).
"""

from eva_pipeline.pipelines.pretrain.pipeline import STAGES, create_pipeline

__all__ = ["STAGES", "create_pipeline"]
