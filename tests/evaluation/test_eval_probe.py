"""Linear probe and its split: separable data is learned, noise is not, and bad input fails loudly."""

from __future__ import annotations

import numpy as np
import pytest

from eva_pipeline.evaluation import ProbeConfig, linear_probe_top1, split_probe

NUM_CLASSES = 10
DIM = 32


def _blobs(n_per_class: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around fixed, well-separated class centres."""
    centres = np.random.default_rng(1234).normal(scale=5.0, size=(NUM_CLASSES, DIM))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    x = centres[y] + rng.normal(scale=spread, size=(y.size, DIM))
    return x.astype(np.float32), y


def test_probe_learns_separable_blobs() -> None:
    train_x, train_y = _blobs(40, seed=0)
    test_x, test_y = _blobs(30, seed=1)
    assert linear_probe_top1(train_x, train_y, test_x, test_y) > 0.95


def test_probe_on_noise_is_near_chance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, DIM)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=1000)
    acc = linear_probe_top1(x[:600], y[:600], x[600:], y[600:])
    assert acc < 0.3


def test_probe_is_deterministic() -> None:
    x, y = _blobs(20, seed=3, spread=12.0)  # overlapping: accuracy well inside (0, 1), so any drift would show

    def run() -> float:
        train, test = split_probe(y, ProbeConfig(test_fraction=0.5))
        return linear_probe_top1(x[train], y[train], x[test], y[test])

    first = run()
    assert run() == first
    assert 0.2 < first < 0.9


@pytest.mark.parametrize("test_fraction", [0.2, 0.4])
def test_split_is_stratified_disjoint_and_complete(test_fraction: float) -> None:
    labels = np.repeat(np.arange(NUM_CLASSES), 50)
    np.random.default_rng(0).shuffle(labels)
    train, test = split_probe(labels, ProbeConfig(test_fraction=test_fraction, seed=7))
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))
    assert test.size == round(test_fraction * labels.size)
    # every class split in the same proportion as the whole
    np.testing.assert_array_equal(np.bincount(labels[test]), np.full(NUM_CLASSES, round(50 * test_fraction)))


def test_split_is_deterministic_and_seeded() -> None:
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    a = split_probe(labels, ProbeConfig(seed=0))
    b = split_probe(labels, ProbeConfig(seed=0))
    c = split_probe(labels, ProbeConfig(seed=1))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_nan_in_train_features_is_named() -> None:
    x, y = _blobs(5, seed=0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="train features contain 1 NaN/inf"):
        linear_probe_top1(bad, y, x, y)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="test features contain 1 NaN/inf"):
        linear_probe_top1(x, y, bad, y)


def test_length_mismatch_is_named() -> None:
    x, y = _blobs(5, seed=0)
    with pytest.raises(ValueError, match=r"length mismatch.*train"):
        linear_probe_top1(x, y[:-1], x, y)
    with pytest.raises(ValueError, match=r"length mismatch.*test"):
        linear_probe_top1(x, y, x[:-1], y)


def test_single_class_is_named() -> None:
    x, _ = _blobs(5, seed=0)
    ones = np.ones(x.shape[0], dtype=int)
    with pytest.raises(ValueError, match="single class"):
        linear_probe_top1(x, ones, x, ones)
    with pytest.raises(ValueError, match="single class"):
        split_probe(ones)


def test_empty_and_malformed_inputs() -> None:
    x, y = _blobs(5, seed=0)
    with pytest.raises(ValueError, match="train features are empty"):
        linear_probe_top1(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="2-D"):
        linear_probe_top1(x[:, :, None], y, x, y)
    with pytest.raises(ValueError, match="width mismatch"):
        linear_probe_top1(x, y, x[:, :-1], y)
    with pytest.raises(ValueError, match="labels is empty"):
        split_probe(np.array([], dtype=int))
    with pytest.raises(ValueError, match="fewer than 2 examples"):
        split_probe(np.array([0, 0, 1, 1, 2]))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match="C must be"):
        ProbeConfig(C=0.0)
