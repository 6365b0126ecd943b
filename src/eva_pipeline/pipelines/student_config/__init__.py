"""Student config: the ``pretrain`` parameter block resolved once into the ``student_config`` dataset.

Teacher targets (made on the student's grid, input size and views), training and evaluation all read the student's
settings from that one dataset, never from another pipeline's parameters.
"""

from eva_pipeline.pipelines.student_config.pipeline import create_pipeline

__all__ = ["create_pipeline"]
