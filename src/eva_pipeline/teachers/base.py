"""The teacher interface: frozen networks that turn the student's image tensor into one target per student patch.

As in EVA-01, student and teacher see the same crop. The student tensor is CLIP-normalised; each teacher brings
it to its own input size (bicubic) and its own normalisation, and returns its token grid flattened row-major so
that target ``i`` belongs to student patch ``i``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD

#: EVA-01 resizes both student and teacher inputs bicubically. Antialias only acts when downscaling and then
#: matches PIL/torchvision resizing.
RESIZE_MODE: str = "bicubic"
RESIZE_ANTIALIAS: bool = True
#: The student images are normalised with these (CLIP's mean/std, as EVA-01 does).
STUDENT_MEAN: tuple[float, float, float] = CLIP_MEAN
STUDENT_STD: tuple[float, float, float] = CLIP_STD
IMAGE_CHANNELS: int = 3


class TeacherWeightsUnavailable(RuntimeError):
    """The teacher's pretrained weights cannot be had offline; the message says how to supply them."""


def resize_bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize like the student pipeline (bicubic); a no-op when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode=RESIZE_MODE, align_corners=False, antialias=RESIZE_ANTIALIAS)


def renormalise(
    images: Tensor,
    src_mean: Sequence[float],
    src_std: Sequence[float],
    dst_mean: Sequence[float],
    dst_std: Sequence[float],
) -> Tensor:
    """Map a tensor normalised with (src_mean, src_std) to one normalised with (dst_mean, dst_std).

    ``(x * s_std + s_mean - d_mean) / d_std`` per channel; identical statistics return the input untouched.
    """
    if tuple(src_mean) == tuple(dst_mean) and tuple(src_std) == tuple(dst_std):
        return images
    shape = (1, -1, 1, 1)

    def as_t(values: Sequence[float]) -> Tensor:
        return torch.as_tensor(values, dtype=images.dtype, device=images.device).view(shape)

    return (images * as_t(src_std) + as_t(src_mean) - as_t(dst_mean)) / as_t(dst_std)


def freeze(module: nn.Module) -> nn.Module:
    """Teachers are never trained: eval mode and no parameter takes gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Teacher(nn.Module, ABC):
    """A frozen feature extractor that yields ``(B, gh*gw, target_dim)`` float32 targets for a student grid.

    Subclasses set ``name`` and ``target_dim`` and implement ``input_size`` (pixels the network needs so that its
    token grid equals ``grid``) and ``_tokens`` (network-normalised images -> ``(B, gh*gw, target_dim)``).
    """

    name: str
    target_dim: int
    #: Normalisation the teacher network was trained with; the student's CLIP statistics are mapped onto it.
    mean: tuple[float, ...] = STUDENT_MEAN
    std: tuple[float, ...] = STUDENT_STD

    @abstractmethod
    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Input (H, W) in pixels whose token grid is ``grid``; ValueError if the network cannot produce it."""

    @abstractmethod
    def _tokens(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Run the network on images already resized and normalised for it."""

    @property
    def device(self) -> torch.device:
        """Device of the teacher's weights (inputs are moved there, outputs moved back)."""
        return next(self.parameters()).device

    @property
    def input_dtype(self) -> torch.dtype:
        """Dtype the network's first layer expects."""
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode even when a parent module calls ``.train()``: BN/dropout must not change targets."""
        return super().train(False)

    def targets(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Targets for the student's CLIP-normalised ``images`` (B,3,H,W) on its patch ``grid`` (gh, gw).

        Uses ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be saved for the backward
        pass of the loss that consumes them.
        """
        if images.ndim != 4 or images.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        gh, gw = (int(g) for g in grid)
        if gh <= 0 or gw <= 0:
            raise ValueError(f"{self.name}: grid must be positive, got {grid}")
        size = self.input_size((gh, gw))
        with torch.no_grad():
            x = images.detach().to(device=self.device, dtype=torch.float32)
            x = renormalise(resize_bicubic(x, size), STUDENT_MEAN, STUDENT_STD, self.mean, self.std)
            out = self._tokens(x.to(self.input_dtype), (gh, gw))
        expected = (images.shape[0], gh * gw, self.target_dim)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{self.name}: produced targets {tuple(out.shape)}, expected {expected}")
        return out.to(device=images.device, dtype=torch.float32)

    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Alias of :meth:`targets` so the teacher composes like any module."""
        return self.targets(images, grid)
