"""CutMix / Mixup with label smoothing, and the loss that matches them (EVA-01 ``run_class_finetuning.py``: timm's
``Mixup`` when ``--mixup`` or ``--cutmix`` > 0, then ``SoftTargetCrossEntropy``; otherwise
``LabelSmoothingCrossEntropy``, or plain cross-entropy without smoothing).

EVA's stages: the IN-21K intermediate fine-tune uses CutMix 1.0 alone with smoothing 0.1; the IN-1K fine-tune mixes
nothing and smooths by 0.3. timm's Mixup (mode ``batch``, one lambda per batch, the box area-corrected) pairs image
``i`` with image ``B - 1 - i``, so every batch a rank mixes must be even: the training loader drops its last,
incomplete batch and the per-rank batch must be even.

Video clips (B, C, T, H, W) are mixed as (B, C * T, H, W) (EVA-01 video: timm's CutMix indexes ``x[:, :, y, x]``, which
on a 5-D clip would cut along time and height): one box through every frame, the same lambda for the whole clip.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn


class EvenBatchMixup(Mixup):
    """timm's ``Mixup`` that refuses an odd batch with a ``ValueError`` saying what to change (timm only asserts,
    which ``python -O`` would skip). Mixes ``images`` (B, C, H, W), or clips (B, C, T, H, W), in place and returns
    them with soft targets."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:
            raise ValueError(
                f"CutMix/Mixup needs an even batch (timm pairs image i with image B-1-i), got {len(images)} images: "
                "use an even per-rank batch size and drop_last=True in the training loader"
            )
        if images.ndim == 5:  # a clip: frames stacked as channels, so the box spans every frame at the same place
            if not images.is_contiguous():
                raise ValueError("clips must be contiguous to be mixed in place (B, C, T, H, W)")
            b, c, t, h, w = images.shape
            _, targets = super().__call__(images.view(b, c * t, h, w), labels)
            return images, targets
        return super().__call__(images, labels)


def build_mixing(
    num_classes: int, *, cutmix_alpha: float = 0.0, mixup_alpha: float = 0.0, label_smoothing: float = 0.0
) -> tuple[EvenBatchMixup | None, nn.Module]:
    """(mixer or None, loss) as the official code chooses them; the mixer smooths the targets itself.

    Probability 1, switch probability 0.5 (used only with both alphas) and per-batch mode are the official defaults.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if min(cutmix_alpha, mixup_alpha) < 0.0 or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"alphas must be >= 0 and label_smoothing in [0, 1), got cutmix_alpha={cutmix_alpha}, "
            f"mixup_alpha={mixup_alpha}, label_smoothing={label_smoothing}"
        )
    if cutmix_alpha > 0.0 or mixup_alpha > 0.0:
        mixer = EvenBatchMixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        return mixer, SoftTargetCrossEntropy()
    if label_smoothing > 0.0:
        return None, LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return None, nn.CrossEntropyLoss()
