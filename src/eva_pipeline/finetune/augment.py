"""Fine-tuning image transforms (EVA-01 ``datasets.build_transform``), built with ``timm.data.create_transform``.

Train: RandomResizedCrop (bicubic, the stage's scale range), flip, RandAugment ``rand-m9-mstd0.5-inc1`` (which turns
colour jitter off, as in the official code), CLIP mean/std, no random erasing (``reprob 0`` in both EVA stages).
Eval: shorter side resized to ``size / crop_pct`` (bicubic), centre crop, CLIP mean/std. Both convert any image to
RGB first, so grayscale data (the demo's) gives three equal channels and RandAugment's RGB fill colour applies.

Pillow 13 trap: RandAugment's ``PosterizeIncreasing`` at magnitude 10 (``m9-mstd0.5`` draws it for ~2% of the
posterize ops, ~0.15% of the images) calls ``ImageOps.posterize(img, 0)``, which now raises where older Pillow
returned a black image. The transforms built here carry a posterize op that keeps the old result; timm's module is
left untouched.

The official ``build_transform`` swaps the crop for ``RandomCrop(padding=4)`` at ``input_size <= 32`` and skips the
eval resize there (CIFAR settings); here the paper's RandomResizedCrop and resize are kept at every size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.auto_augment import posterize as timm_posterize
from torchvision import transforms

from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD

#: EVA-01 fine-tuning's RandAugment (``--aa`` default in ``run_class_finetuning.py``, both stages).
EVA_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
INTERPOLATION = "bicubic"


class ToRGB:
    """PIL image of any mode -> RGB (grayscale replicated), so every later op sees three channels."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def safe_posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with 0 bits giving the black image that Pillow < 13 returned (Pillow 13 raises)."""
    if bits_to_keep <= 0:
        return image.point([0] * (256 * len(image.getbands())))
    return timm_posterize(image, bits_to_keep, **kwargs)


def _augment_ops(transform: object) -> Iterator[AugmentOp]:
    """Every timm ``AugmentOp`` inside a transform: Compose, RandAugment/AugMix (``ops``), AutoAugment (``policy``)."""
    if isinstance(transform, AugmentOp):
        yield transform
        return
    for attr in ("transforms", "ops", "policy"):
        children = getattr(transform, attr, None)
        if isinstance(children, (list, tuple)):
            for child in children:
                yield from _augment_ops(child)
    if isinstance(transform, (list, tuple)):  # AutoAugment sub-policies are lists of ops
        for child in transform:
            yield from _augment_ops(child)


def make_posterize_safe(transform: object) -> int:
    """Give the posterize ops of ``transform`` (this instance only) :func:`safe_posterize`; returns how many."""
    count = 0
    for op in _augment_ops(transform):
        if op.aug_fn is timm_posterize:
            op.aug_fn = safe_posterize
            count += 1
    return count


def train_transform(
    size: int,
    scale: tuple[float, float],
    *,
    auto_augment: str | None = EVA_RAND_AUGMENT,
    hflip: float = 0.5,
    re_prob: float = 0.0,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> transforms.Compose:
    """PIL image -> (3, size, size) float tensor; ``scale`` is RandomResizedCrop's area range ((0.5, 1) in the IN-21K
    intermediate stage, (0.08, 1) in IN-1K)."""
    tf = create_transform(
        size,
        is_training=True,
        scale=scale,
        hflip=hflip,
        auto_augment=auto_augment,
        interpolation=INTERPOLATION,
        re_prob=re_prob,
        mean=mean,
        std=std,
    )
    make_posterize_safe(tf)
    return transforms.Compose([ToRGB(), *tf.transforms])


def eval_transform(
    size: int,
    crop_pct: float = 1.0,
    *,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> transforms.Compose:
    """PIL image -> (3, size, size): shorter side to ``floor(size / crop_pct)`` (bicubic), centre crop ``size``.

    ``crop_pct`` 1.0 is EVA's flag in both stages (the official default, 224/256 below 384 px, is not used there).
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    tf = create_transform(
        size, is_training=False, crop_pct=crop_pct, crop_mode="center", interpolation=INTERPOLATION, mean=mean, std=std
    )
    return transforms.Compose([ToRGB(), *tf.transforms])
