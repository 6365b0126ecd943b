"""Fine-tune transforms: the Pillow 13 posterize trap is handled (0 bits -> black, as before), the train transform is
EVA's timm recipe, the eval transform equals the official resize + centre crop, grayscale becomes RGB."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from eva_pipeline.finetune import augment
from eva_pipeline.finetune.augment import (
    EVA_RAND_AUGMENT,
    eval_transform,
    make_posterize_safe,
    safe_posterize,
    train_transform,
)
from eva_pipeline.loader.classification import seeded_call
from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0, low: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(low, 256, shape, dtype=np.uint8)).convert(mode)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ---- the posterize trap ---------------------------------------------------------------------------------------------
def test_pillow_refuses_zero_bits_and_safe_posterize_gives_black() -> None:
    image = _image(9, 7, low=1)
    with pytest.raises(ValueError, match="bits must be between"):  # the trap itself (Pillow >= 13)
        ImageOps.posterize(image, 0)
    for mode in ("RGB", "L"):
        black = safe_posterize(image.convert(mode), 0)
        assert black.mode == mode and black.size == (9, 7)
        assert not _pixels(black).any()
    for bits in range(1, 9):  # every other level is exactly timm's / Pillow's op
        assert np.array_equal(_pixels(safe_posterize(image, bits)), _pixels(ImageOps.posterize(image, bits)))
    assert safe_posterize(image, 8) is image  # timm's shortcut kept


def test_posterize_only_randaugment_at_magnitude_10() -> None:
    """RandAugment of PosterizeIncreasing alone at m10, mstd 0.5: half the magnitudes clip to 10 -> 0 bits. timm's op
    raises; after ``make_posterize_safe`` the images are black at the expected rate, the rest exactly posterized."""
    ops = ["PosterizeIncreasing"]
    plain = rand_augment_transform("rand-m10-mstd0.5-inc1", {}, transforms=ops)
    random.seed(0)
    np.random.seed(0)
    with pytest.raises(ValueError, match="bits must be between"):
        for _ in range(50):
            plain(_image(8, 8, low=128))
    safe = rand_augment_transform("rand-m10-mstd0.5-inc1", {}, transforms=ops)
    assert make_posterize_safe(safe) == 1
    random.seed(0)
    np.random.seed(0)
    image = _image(8, 8, low=128)  # >= 128 everywhere: 1 bit keeps it non-black, only 0 bits gives black
    outputs = [_pixels(safe(image)) for _ in range(1000)]
    black = sum(not out.any() for out in outputs)
    # Two layers, each applied with p 0.5 and 0 bits with p 0.5: 1 - (1 - 0.25)^2 = 0.4375 (std 0.016 at n 1000).
    assert abs(black / 1000 - 0.4375) < 0.05
    allowed = {_pixels(ImageOps.posterize(image, b)).tobytes() for b in range(1, 5)} | {_pixels(image).tobytes()}
    assert all(out.tobytes() in allowed for out in outputs if out.any())


def test_eva_train_transform_survives_the_zero_bit_draws(monkeypatch) -> None:
    """The EVA string (m9, mstd 0.5) reaches 0 bits ~0.15% of images: timm's RandAugment dies in the seeded run;
    ours passes the same draws (identical outputs up to the first one) and handles every 0-bit call."""
    size, count = 8, 4000
    image = _image(size, size, seed=3)
    timm_tf = create_transform(
        size, True, auto_augment=EVA_RAND_AUGMENT, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD
    )
    plain = next(t for t in timm_tf.transforms if _is_ra(t))
    ours = next(t for t in train_transform(size, (0.08, 1.0)).transforms if _is_ra(t))
    random.seed(0)
    np.random.seed(0)
    plain_outputs = []
    with pytest.raises(ValueError, match="bits must be between"):
        for _ in range(count):
            plain_outputs.append(_pixels(plain(image)))
    zero_bit_calls = []

    def spy(img: Image.Image, bits: int, **kwargs) -> Image.Image:
        zero_bit_calls.append(bits <= 0)
        return safe_posterize(img, bits, **kwargs)

    monkeypatch.setattr(next(op for op in ours.ops if op.name == "PosterizeIncreasing"), "aug_fn", spy)
    random.seed(0)
    np.random.seed(0)
    ours_outputs = [_pixels(ours(image)) for _ in range(count)]
    first = len(plain_outputs)
    assert all(np.array_equal(a, b) for a, b in zip(plain_outputs, ours_outputs[:first], strict=True))
    assert 1 <= sum(zero_bit_calls) <= 20  # ~0.15% of 4000 images


def _is_ra(transform: object) -> bool:
    return isinstance(transform, RandAugment)


def test_factory_leaves_timms_module_untouched() -> None:
    train_transform(16, (0.5, 1.0))
    fresh = rand_augment_transform(EVA_RAND_AUGMENT, {})
    assert all(op.aug_fn is not safe_posterize for op in fresh.ops)
    assert augment.timm_posterize.__module__ == "timm.data.auto_augment"


# ---- train transform -----------------------------------------------------------------------------------------------
def test_train_transform_is_evas_recipe() -> None:
    tf = train_transform(28, (0.5, 1.0))
    kinds = [type(t).__name__ for t in tf.transforms]
    assert kinds == [
        "ToRGB",
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
    ]  # no ColorJitter (RandAugment turns it off), no RandomErasing (reprob 0)
    crop = tf.transforms[1]
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.5, 1.0) and crop.size == (28, 28)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    ra = tf.transforms[3]
    assert [op.name for op in ra.ops] == _RAND_INCREASING_TRANSFORMS and ra.num_layers == 2
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ra.ops} == {(9, 0.5, 0.5)}
    assert next(op for op in ra.ops if op.name == "PosterizeIncreasing").aug_fn is safe_posterize
    assert tf.transforms[5].mean.tolist() == pytest.approx(list(CLIP_MEAN))
    assert tf.transforms[5].std.tolist() == pytest.approx(list(CLIP_STD))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_train_transform_outputs_rgb_tensors(mode: str) -> None:
    tf = train_transform(28, (0.08, 1.0))
    for seed in range(20):
        out = seeded_call(tf, _image(28, 28, mode, seed=seed), seed)
        assert out.shape == (3, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_seeded_call_is_a_function_of_the_seed_and_restores_the_rngs() -> None:
    tf, image = train_transform(28, (0.08, 1.0)), _image(40, 30)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    a, b, c = seeded_call(tf, image, 11), seeded_call(tf, image, 11), seeded_call(tf, image, 12)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- eval transform ------------------------------------------------------------------------------------------------
def _official_eval(size: int, crop_pct: float) -> transforms.Compose:
    """EVA-01 ``datasets.build_transform(is_train=False)`` above 32 px (its ImageFolder loader converts to RGB)."""
    return transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


@pytest.mark.parametrize(("size", "crop_pct"), [(28, 1.0), (28, 0.875), (40, 0.9), (224, 0.875)])
@pytest.mark.parametrize("wh", [(50, 37), (37, 50), (20, 20)])
def test_eval_transform_sizes_and_values_match_the_official(size: int, crop_pct: float, wh: tuple[int, int]) -> None:
    image = _image(*wh, seed=size)
    got = eval_transform(size, crop_pct)(image)
    assert got.shape == (3, size, size)
    assert torch.allclose(got, _official_eval(size, crop_pct)(image), atol=1e-6)
    # crop_pct matters: a different one gives a different crop of a non-uniform image
    assert not torch.allclose(got, eval_transform(size, crop_pct * 0.8)(image), atol=1e-3)


def test_eval_transform_of_grayscale_has_three_equal_channels() -> None:
    out = eval_transform(28)(_image(28, 28, "L"))
    std, mean = torch.tensor(CLIP_STD)[:, None, None], torch.tensor(CLIP_MEAN)[:, None, None]
    pixels = out * std + mean
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)
    assert torch.allclose(pixels[0], torch.from_numpy(np.array(_image(28, 28, "L"))).float() / 255, atol=1e-6)


def test_bad_crop_pct() -> None:
    with pytest.raises(ValueError, match="crop_pct must be in"):
        eval_transform(28, 1.5)
