from kedro.pipeline import Pipeline

from eva_pipeline.pipelines import evaluation, ingestion, student_config, teacher_targets, train_student

STAGES = {
    "ingestion": ingestion,
    "student_config": student_config,
    "teacher_targets": teacher_targets,
    "train_student": train_student,
    "evaluation": evaluation,
}


def create_pipeline(**kwargs) -> Pipeline:
    return sum((stage.create_pipeline() for stage in STAGES.values()), Pipeline([]))
