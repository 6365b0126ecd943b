"""EVA-01's pre-training view augmentation (as ``run_eva_pretraining.py`` builds it): flip p=0.5 +
RandomResizedCrop(scale (0.2, 1), ratio (3/4, 4/3), bicubic, 10 tries then a centre crop), seeded per
(seed, epoch, index); student and teacher see the identical augmented tensor (as in EVA-01)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from eva_pipeline.config import PretrainParams
from eva_pipeline.loader.augment import RandomResizedCropFlip, View, view_rng
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.masking import mask_rng
from eva_pipeline.models import EvaMIM
from eva_pipeline.training import loop, recipe

DRAWS = 2000


@pytest.fixture(scope="module")
def views_224() -> list[View]:
    aug = RandomResizedCropFlip(224)
    return [aug.sample(224, 224, view_rng(0, 0, i)) for i in range(DRAWS)]


def _area_and_ratio(views: list[View], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    area = np.array([v.height * v.width / (height * width) for v in views])
    ratio = np.array([v.width / v.height for v in views])
    return area, ratio


def test_boxes_lie_inside_the_image_with_scale_and_ratio_in_range(views_224):
    for v in views_224:
        assert v.top >= 0 and v.top + v.height <= 224 and v.left >= 0 and v.left + v.width <= 224, v
        assert v.height > 0 and v.width > 0
    area, ratio = _area_and_ratio(views_224, 224, 224)
    # Box sides are rounded to whole pixels: allow 2% around the nominal ranges.
    assert ((area >= 0.2 * 0.98) & (area <= 1.0)).all()
    assert ((ratio >= 0.75 * 0.98) & (ratio <= 4 / 3 * 1.02)).all()
    # The area fraction covers [0.2, 1]: every eighth of the range is hit, down to the bottom and near the top.
    counts, _ = np.histogram(area, bins=8, range=(0.2, 1.0))
    assert (counts > 20).all(), counts
    assert area.min() < 0.21 and area.max() > 0.95
    # Log-uniform aspect: symmetric around 1 and reaching both ends.
    assert abs(np.log(ratio).mean()) < 0.02
    assert ratio.min() < 0.76 and ratio.max() > 1.31
    # The top-left corner is uniform over the free range: left and top both vary widely.
    assert len({v.left for v in views_224}) > 50 and len({v.top for v in views_224}) > 50


def test_box_distribution_matches_torchvision(views_224):
    """Same algorithm as torchvision's RandomResizedCrop.get_params: two-sample KS on area and aspect."""
    torch.manual_seed(0)
    image = torch.zeros(3, 224, 224)
    tv = [RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(DRAWS)]
    tv_area = np.array([h * w / 224**2 for _, _, h, w in tv])
    tv_ratio = np.array([w / h for _, _, h, w in tv])
    area, ratio = _area_and_ratio(views_224, 224, 224)
    assert ks_2samp(area, tv_area).pvalue > 1e-3
    assert ks_2samp(ratio, tv_ratio).pvalue > 1e-3
    # A plain uniform area in [0.2, 1] would have mean 0.6; rejected tries at large areas pull it down alike.
    assert abs(area.mean() - tv_area.mean()) < 0.02


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio", "expected"),
    [
        # Square image, ratio >= 4 with area >= half the image: w = sqrt(area * ratio) > 224 on every try.
        (224, 224, (0.5, 1.0), (4.0, 5.0), View(top=84, left=0, height=56, width=224, flip=False)),
        # Wide image, tall ratios only: h = sqrt(area / ratio) > 100 on every try -> full height, ratio max.
        (100, 300, (0.9, 1.0), (0.1, 0.2), View(top=0, left=140, height=100, width=20, flip=False)),
    ],
)
def test_centre_crop_fallback_when_no_try_fits(height, width, scale, ratio, expected):
    aug = RandomResizedCropFlip(32, scale=scale, ratio=ratio, flip_prob=0.0)
    for index in range(50):
        assert aug.sample(height, width, view_rng(3, 1, index)) == expected
    # torchvision's fallback gives the same box.
    top, left, h, w = RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale), list(ratio))
    assert (top, left, h, w) == (expected.top, expected.left, expected.height, expected.width)


def test_fallback_within_ratio_is_the_whole_image():
    """A square image and near-full-area crops with ratios in (1/2, 2): a try fits only when its ratio is within
    about 1% of 1, so most draws fall back; the image's own ratio is allowed, so the fallback is the whole image."""
    aug = RandomResizedCropFlip(8, scale=(0.99, 1.0), ratio=(0.5, 2.0), flip_prob=0.0)
    views = [aug.sample(100, 100, view_rng(0, 0, i)) for i in range(200)]
    assert all(v.top >= 0 and v.top + v.height <= 100 and v.left >= 0 and v.left + v.width <= 100 for v in views)
    whole = sum(v == View(0, 0, 100, 100, False) for v in views)
    assert whole > 100, whole


def test_flip_frequency(views_224):
    flips = np.array([v.flip for v in views_224])
    assert abs(flips.mean() - 0.5) < 0.05  # binomial std 0.011
    never = RandomResizedCropFlip(224, flip_prob=0.0)
    always = RandomResizedCropFlip(224, flip_prob=1.0)
    assert not any(never.sample(224, 224, view_rng(0, 0, i)).flip for i in range(200))
    assert all(always.sample(224, 224, view_rng(0, 0, i)).flip for i in range(200))


def test_views_are_reproducible_from_seed_epoch_index(views_224):
    aug = RandomResizedCropFlip(224)
    again = [aug.sample(224, 224, view_rng(0, 0, i)) for i in range(100)]
    assert again == views_224[:100]
    for other in ([view_rng(1, 0, i) for i in range(100)], [view_rng(0, 1, i) for i in range(100)]):
        changed = sum(aug.sample(224, 224, rng) != v for rng, v in zip(other, views_224[:100], strict=True))
        assert changed > 95
    # The view stream is independent of the mask stream of the same (seed, epoch, index).
    assert view_rng(0, 0, 5).random(4).tolist() != mask_rng(0, 0, 5).random(4).tolist()


def test_invalid_ranges_are_refused():
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropFlip(224, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropFlip(224, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCropFlip(224, ratio=(4 / 3, 3 / 4))


def test_apply_is_resized_crop_then_flip_of_the_same_box():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=gen)
    aug = RandomResizedCropFlip(32)
    flipped = 0
    for index in range(20):
        view = aug.sample(60, 80, view_rng(7, 0, index))
        out = aug.apply(image, view)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        crop = image[:, view.top : view.top + view.height, view.left : view.left + view.width]
        resized = TF.resize(crop, [32, 32], interpolation=InterpolationMode.BICUBIC, antialias=True)
        expected = TF.horizontal_flip(resized) if view.flip else resized
        assert torch.equal(out, expected)
        same_box = TF.resized_crop(
            image,
            view.top,
            view.left,
            view.height,
            view.width,
            [32, 32],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        assert torch.equal(out, same_box.flip(-1) if view.flip else same_box)
        unflipped = aug.apply(image, View(view.top, view.left, view.height, view.width, False))
        assert torch.equal(out, unflipped.flip(-1) if view.flip else unflipped)
        flipped += view.flip
    assert 0 < flipped < 20  # both branches were exercised
    # Grayscale works the same (one channel in, one out).
    gray = aug.apply(image[:1], View(0, 0, 60, 80, True))
    assert gray.shape == (1, 32, 32)


def test_teacher_sees_exactly_the_students_augmented_input(tmp_path, monkeypatch):
    """With augmentation on and an online target function, the tensor the teacher gets is the student's input,
    and it is the seeded augmented view of each sample (not the raw image)."""
    gen = torch.Generator().manual_seed(5)
    num, dim = 16, 8
    images = torch.randint(0, 256, (num, 1, 28, 28), dtype=torch.uint8, generator=gen)
    targets = torch.randn(num, 49, dim, generator=gen)
    teacher_inputs, student_inputs = [], []

    class RecordingMIM(EvaMIM):
        def forward(self, x, mask):
            student_inputs.append(x.detach().clone())
            return super().forward(x, mask)

    def online_teacher(indices, x):
        teacher_inputs.append((indices.clone(), x.clone()))
        return targets[indices]

    monkeypatch.setattr(recipe, "EvaMIM", RecordingMIM)  # make_student builds the student
    params = PretrainParams.model_validate(
        {
            "model": {
                "name": "eva_tiny_patch4_28",
                "overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_hidden_dim": 64, "drop_path_rate": 0.0},
            },
            "masking": {"num_masking_patches": 20, "min_num_patches": 4},
            "optimizer": {"lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 1, "weight_decay": 0.05},
            "augmentation": {"enabled": True},
            "epochs": 2,
            "batch_size": 8,
            "device": "cpu",
            "seed": 3,
            "checkpoint": {"every_steps": 100},
        }
    )
    result = loop.run_pretraining(params, images, online_teacher, dim, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert len(result.history) == 4 and len(teacher_inputs) == len(student_inputs) == 4

    aug = RandomResizedCropFlip(28, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    views_of_0 = []
    for step, ((indices, seen_by_teacher), seen_by_student) in enumerate(
        zip(teacher_inputs, student_inputs, strict=True)
    ):
        assert torch.equal(seen_by_teacher, seen_by_student)
        epoch = step // 2
        views = [aug.sample(28, 28, view_rng(3, epoch, int(i))) for i in indices]
        expected = to_model_input(
            torch.stack([aug.apply(images[i], v) for i, v in zip(indices, views, strict=True)]), 28
        )
        assert torch.equal(seen_by_teacher, expected)
        assert not torch.equal(seen_by_teacher, to_model_input(images[indices], 28))  # really augmented
        views_of_0 += [v for i, v in zip(indices, views, strict=True) if int(i) == 0]
    assert len(views_of_0) == 2 and views_of_0[0] != views_of_0[1]  # a new view of an image every epoch


def test_scale_covers_the_range_on_a_non_square_image():
    aug = RandomResizedCropFlip(224)
    views = [aug.sample(300, 400, view_rng(2, 0, i)) for i in range(DRAWS)]
    area, ratio = _area_and_ratio(views, 300, 400)
    assert all(v.top + v.height <= 300 and v.left + v.width <= 400 for v in views)
    assert ((area >= 0.2 * 0.98) & (area <= 1.0)).all()
    assert ((ratio >= 0.75 * 0.98) & (ratio <= 4 / 3 * 1.02)).all()
    assert area.min() < 0.21 and area.max() > 0.9
    # Large tall boxes do not fit a wide image, so wide ratios win there: exactly as in torchvision.
    torch.manual_seed(1)
    tv = [RandomResizedCrop.get_params(torch.zeros(1, 300, 400), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(DRAWS)]
    assert ks_2samp(ratio, [w / h for _, _, h, w in tv]).pvalue > 1e-3
    assert ks_2samp(area, [h * w / 120_000 for _, _, h, w in tv]).pvalue > 1e-3
