"""Named EVA-01 configurations: the only place where model sizes are written down."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.eva import HEAD_INIT_SCALE, EvaClassifier, EvaMIM
from eva_pipeline.models.video import DEFAULT_TUBELET, EvaVideoClassifier

# EVA-01 fine-tuning (run_class_finetuning.py, EVA-01 README commands): drop path 0.4 in the IN-21K and IN-1K
# fine-tunes.
FINETUNE_DROP_PATH_RATE = 0.4

_CONFIGS: dict[str, EvaConfig] = {
    # EVA-g/14, the paper's 1.0B model (EVA paper, Sec. 2.2).
    "eva_giant_patch14_224": EvaConfig(
        img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144
    ),
    # Standard ViT-L/B/S widths at patch 14, for scaling studies and smaller machines.
    "eva_large_patch14_224": EvaConfig(
        img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096
    ),
    "eva_base_patch14_224": EvaConfig(
        img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072
    ),
    "eva_small_patch14_224": EvaConfig(
        img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_hidden_dim=1536
    ),
    # 28x28 demo inputs (Fashion-MNIST): patch 4 -> 7x7 grid, the grid of the packaged EfficientNet teacher.
    "eva_tiny_patch4_28": EvaConfig(img_size=28, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_hidden_dim=512),
}
MODEL_CONFIGS: MappingProxyType[str, EvaConfig] = MappingProxyType(_CONFIGS)


class UnknownModelError(KeyError, ValueError):
    """An unknown model name; both a KeyError (lookup) and a ValueError (bad argument), printed without quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def list_models() -> list[str]:
    """Known model names, sorted."""
    return sorted(_CONFIGS)


def get_config(name: str, **overrides: Any) -> EvaConfig:
    """The named config with ``overrides`` applied (validated again by ``EvaConfig``)."""
    try:
        base = _CONFIGS[name]
    except KeyError:
        raise UnknownModelError(f"unknown EVA model {name!r}; known models: {', '.join(list_models())}") from None
    fields = {f.name for f in dataclasses.fields(EvaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown EvaConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(base, **overrides)


def check_img_size(model_name: str, overrides: Mapping[str, Any], img_size: int) -> None:
    """Raise ``ValueError`` naming multiples to use when the patch of ``model_name`` (with ``overrides``) does not
    divide ``img_size`` (also for an unknown model): what a fine-tune stage and its pre-flight check ask."""
    patch = int(overrides.get("patch_size", get_config(model_name).patch_size))
    if img_size % patch:
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        raise ValueError(
            f"img_size {img_size} is not divisible by the patch size {patch} of {model_name}: use a multiple of "
            f"{patch} (e.g. {lower or upper} or {upper})"
        )


def create_model(name: str, **overrides: Any) -> EvaMIM:
    """The MIM pre-training model ``name``; ``overrides`` are EvaConfig fields (e.g. ``target_dim=112``)."""
    return EvaMIM(get_config(name, **overrides))


def create_classifier(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path_rate: float = FINETUNE_DROP_PATH_RATE,
    freeze_patch_embed: bool = True,
    head_init_scale: float = HEAD_INIT_SCALE,
    **overrides: Any,
) -> EvaClassifier:
    """The fine-tune model ``name`` (e.g. ``img_size=336`` for the IN-1K stage); pos_embed resampling on load."""
    if img_size is not None:
        overrides["img_size"] = img_size
    config = get_config(name, drop_path_rate=drop_path_rate, **overrides)
    return EvaClassifier(config, num_classes, freeze_patch_embed=freeze_patch_embed, head_init_scale=head_init_scale)


def create_video_classifier(
    name: str,
    num_classes: int,
    num_frames: int,
    *,
    drop_path_rate: float,
    tubelet: int = DEFAULT_TUBELET,
    img_size: int | None = None,
    freeze_patch_embed: bool = False,
    head_init_scale: float = HEAD_INIT_SCALE,
    **overrides: Any,
) -> EvaVideoClassifier:
    """The space-time classifier ``name`` over clips of ``num_frames`` frames (the patch embedding trained, as EVA's
    video fine-tunes); the drop path is the stage's (0.3 K722, 0.2 K400/600/700), so it has no default here."""
    if img_size is not None:
        check_img_size(name, overrides, img_size)
        overrides["img_size"] = img_size
    config = get_config(name, drop_path_rate=drop_path_rate, **overrides)
    return EvaVideoClassifier(
        config,
        num_classes,
        num_frames=num_frames,
        tubelet=tubelet,
        freeze_patch_embed=freeze_patch_embed,
        head_init_scale=head_init_scale,
    )
