"""Block-wise masking reproduces BEiT/EVA's statistics (``masking_generator.py``) and is reproducible from a seed."""

import numpy as np
import pytest

from eva_pipeline.masking import BlockMaskGenerator, alternating_mask, mask_rng

DRAWS = 10_000


@pytest.fixture(scope="module")
def eva_draws() -> tuple[np.ndarray, np.ndarray]:
    generator = BlockMaskGenerator(grid=(16, 16), num_masking_patches=105, min_num_patches=16)
    rng = np.random.default_rng(1234)
    samples = [generator.sample(rng) for _ in range(DRAWS)]
    return np.stack([m for m, _ in samples]), np.array([b for _, b in samples])


def test_masked_count_statistics(eva_draws):
    masks, _ = eva_draws
    counts = masks.reshape(DRAWS, -1).sum(axis=1)
    # Reference (20k draws): mean 104.44, std 1.04, P(exactly 105) ~ 0.65. Tolerances ~4 standard errors.
    assert counts.mean() == pytest.approx(104.44, abs=0.05)
    assert counts.std() == pytest.approx(1.04, abs=0.08)
    assert (counts == 105).mean() == pytest.approx(0.65, abs=0.02)
    assert counts.max() <= 105


def test_blocks_per_mask(eva_draws):
    _, blocks = eva_draws
    assert blocks.mean() == pytest.approx(4.7, abs=0.15)
    assert blocks.min() >= 1


def test_spatial_distribution(eva_draws):
    masks, _ = eva_draws
    centre = masks[:, 7:9, 7:9].mean()
    corners = masks[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean()
    edge_middle = np.concatenate([masks[:, 0, 7:9], masks[:, -1, 7:9], masks[:, 7:9, 0], masks[:, 7:9, -1]], 1).mean()
    assert centre == pytest.approx(0.75, abs=0.02)
    assert edge_middle == pytest.approx(0.19, abs=0.02)
    assert corners == pytest.approx(0.04, abs=0.01)


def test_beit_configuration_mean():
    generator = BlockMaskGenerator(grid=(14, 14), num_masking_patches=75, min_num_patches=16)
    rng = np.random.default_rng(7)
    counts = np.array([generator(rng).sum() for _ in range(DRAWS)])
    assert counts.mean() == pytest.approx(74.47, abs=0.06)
    assert counts.max() <= 75


def test_seeded_draws_are_reproducible_and_vary_by_index():
    generator = BlockMaskGenerator(grid=(16, 16), num_masking_patches=105)
    first = generator(mask_rng(seed=0, epoch=3, index=42))
    again = generator(mask_rng(seed=0, epoch=3, index=42))
    other = generator(mask_rng(seed=0, epoch=3, index=43))
    next_epoch = generator(mask_rng(seed=0, epoch=4, index=42))
    assert first.dtype == bool and first.shape == (16, 16)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, next_epoch)


def test_small_demo_grid():
    generator = BlockMaskGenerator(grid=(7, 7), num_masking_patches=20, min_num_patches=4)
    rng = np.random.default_rng(0)
    counts = np.array([generator(rng).sum() for _ in range(2000)])
    assert counts.max() <= 20
    assert counts.mean() > 18


def test_alternating_validation_mask():
    mask = alternating_mask(256)
    assert mask.sum() == 128
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(0, 256, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": (16, 16), "num_masking_patches": 0}, r"num_masking_patches must be in \[1, 256\]"),
        ({"grid": (16, 16), "num_masking_patches": 257}, r"num_masking_patches must be in \[1, 256\]"),
        ({"grid": (0, 16), "num_masking_patches": 5}, "mask grid must be positive"),
        ({"grid": (16, 16), "num_masking_patches": 5, "min_num_patches": 0}, "min_num_patches"),
        ({"grid": (16, 16), "num_masking_patches": 5, "min_aspect": -1.0}, "aspect range"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockMaskGenerator(**kwargs)
