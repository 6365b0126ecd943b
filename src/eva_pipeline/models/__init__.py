"""The EVA-01 ViT family (Kedro-free): configs, image and space-time video modules with official key names, and
official checkpoint I/O."""

from eva_pipeline.models.checkpoint import (
    CheckpointError,
    LoadReport,
    extract_state_dict,
    load_official_checkpoint,
    resample_image_pos_embed,
    save_official_checkpoint,
)
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.eva import (
    EvaAttention,
    EvaBlock,
    EvaClassifier,
    EvaMIM,
    EvaTokens,
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
    create_video_classifier,
    get_config,
    list_models,
)
from eva_pipeline.models.video import (
    VIDEO_KEY,
    EvaVideoClassifier,
    VideoPatchEmbed,
    VideoStartReport,
    inflate_image_state,
    inflate_patch_embed_weight,
    load_video_start,
    resample_temporal_pos_embed,
    resample_video_pos_embed,
)

__all__ = [
    "FINETUNE_DROP_PATH_RATE",
    "MODEL_CONFIGS",
    "VIDEO_KEY",
    "CheckpointError",
    "ClassifierCheckpoint",
    "EvaAttention",
    "EvaBlock",
    "EvaClassifier",
    "EvaConfig",
    "EvaMIM",
    "EvaTokens",
    "EvaViT",
    "EvaVideoClassifier",
    "LoadReport",
    "UnknownModelError",
    "VideoPatchEmbed",
    "VideoStartReport",
    "check_img_size",
    "create_classifier",
    "create_model",
    "create_video_classifier",
    "extract_state_dict",
    "get_config",
    "get_layer_id",
    "inflate_image_state",
    "inflate_patch_embed_weight",
    "list_models",
    "load_classifier_checkpoint",
    "load_official_checkpoint",
    "load_video_start",
    "resample_image_pos_embed",
    "resample_temporal_pos_embed",
    "resample_video_pos_embed",
    "save_classifier_checkpoint",
    "save_official_checkpoint",
    "trunc_normal_sigma_",
]
