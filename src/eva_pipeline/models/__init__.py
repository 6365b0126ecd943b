"""The EVA-01 ViT family (Kedro-free): configs, modules with official key names, and official checkpoint I/O."""

from eva_pipeline.models.checkpoint import (
    CheckpointError,
    LoadReport,
    extract_state_dict,
    load_official_checkpoint,
    save_official_checkpoint,
)
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.eva import (
    EvaAttention,
    EvaBlock,
    EvaClassifier,
    EvaMIM,
    EvaViT,
    get_layer_id,
    trunc_normal_sigma_,
)
from eva_pipeline.models.finetuned import ClassifierCheckpoint, load_classifier_checkpoint, save_classifier_checkpoint
from eva_pipeline.models.registry import (
    FINETUNE_DROP_PATH_RATE,
    MODEL_CONFIGS,
    UnknownModelError,
    check_img_size,
    create_classifier,
    create_model,
    get_config,
    list_models,
)

__all__ = [
    "FINETUNE_DROP_PATH_RATE",
    "MODEL_CONFIGS",
    "CheckpointError",
    "ClassifierCheckpoint",
    "EvaAttention",
    "EvaBlock",
    "EvaClassifier",
    "EvaConfig",
    "EvaMIM",
    "EvaViT",
    "LoadReport",
    "UnknownModelError",
    "check_img_size",
    "create_classifier",
    "create_model",
    "extract_state_dict",
    "get_config",
    "get_layer_id",
    "list_models",
    "load_classifier_checkpoint",
    "load_official_checkpoint",
    "save_classifier_checkpoint",
    "save_official_checkpoint",
    "trunc_normal_sigma_",
]
