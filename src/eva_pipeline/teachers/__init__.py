"""Frozen teachers that produce one regression target per student patch (EVA paper, Sec. 2.2), Kedro-free.

``OpenClipTeacher`` is the paper's teacher (OpenAI CLIP ViT-L/14); ``EfficientNetLiteTeacher`` is the packaged real
network usable offline. Both follow :class:`Teacher`: ``targets(images, grid) -> (B, gh*gw, target_dim)``.
The backends (open_clip, efficientnet_lite_pytorch) are imported on first attribute access, so importing the package
is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eva_pipeline.teachers.base import Teacher, TeacherWeightsUnavailable
from eva_pipeline.teachers.factory import (
    TEACHER_KINDS,
    check_teacher_weights,
    create_teacher,
    create_teacher_skeleton,
    teacher_target_dim,
)

if TYPE_CHECKING:
    from eva_pipeline.teachers.efficientnet_lite import EfficientNetLiteTeacher
    from eva_pipeline.teachers.open_clip_teacher import OpenClipTeacher

__all__ = [
    "TEACHER_KINDS",
    "EfficientNetLiteTeacher",
    "OpenClipTeacher",
    "Teacher",
    "TeacherWeightsUnavailable",
    "check_teacher_weights",
    "create_teacher",
    "create_teacher_skeleton",
    "teacher_target_dim",
]

_LAZY: dict[str, str] = {
    "OpenClipTeacher": "eva_pipeline.teachers.open_clip_teacher",
    "EfficientNetLiteTeacher": "eva_pipeline.teachers.efficientnet_lite",
}


def __getattr__(name: str) -> Any:
    """Import a backend only when its teacher class is asked for (open_clip pulls in timm/torchvision)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
