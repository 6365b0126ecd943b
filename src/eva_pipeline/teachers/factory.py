"""Build a teacher from a config-friendly kind string (kept import-light: each kind imports its backend lazily)."""

from __future__ import annotations

from typing import Any, Callable

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
