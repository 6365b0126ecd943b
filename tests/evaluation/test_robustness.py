"""Robustness stand-ins: sketch and inverted renditions on hand-made images, natural-adversarial selection equal to
an independently fitted sklearn classifier, clear errors, the real/synthetic registry, and one sanity run on the
embedded Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from eva_pipeline.evaluation.robustness import (
    NATURAL_ADVERSARIAL_CLASSES,
    ROBUSTNESS_SETS,
    RobustnessSet,
    inverted,
    natural_adversarial,
    sketch,
)
from eva_pipeline.ingest.readers.idx import read_idx

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"


def _step(value_left: int = 0, value_right: int = 255, size: int = 12, at: int = 5) -> np.ndarray:
    image = np.full((size, size), value_left, dtype=np.uint8)
    image[:, at:] = value_right
    return image


@pytest.mark.parametrize("value", [0, 17, 128, 255])
def test_sketch_of_a_flat_image_is_white(value) -> None:
    out = sketch(np.full((2, 9, 7), value, dtype=np.uint8))
    assert out.shape == (2, 9, 7) and out.dtype == np.uint8 and (out == 255).all()


def test_sketch_of_a_step_edge_is_dark_exactly_along_the_edge() -> None:
    out = sketch(_step(at=5)[None])[0]
    # The 3x3 Sobel sees the step at columns 4 and 5 (the last dark and first bright column); full step -> black.
    assert (out[:, [4, 5]] == 0).all()
    assert (np.delete(out, [4, 5], axis=1) == 255).all()
    # The same edge, horizontal: rows instead of columns.
    assert np.array_equal(sketch(_step(at=5).T[None])[0], out.T)
    # A weaker step gives lighter, not absent, strokes in the same place.
    faint = sketch(_step(100, 140, at=5)[None])[0]
    assert (faint[:, [4, 5]] < 255).all() and (faint[:, [4, 5]] > 0).all()
    assert (np.delete(faint, [4, 5], axis=1) == 255).all()


def test_sketch_channels_first_is_gray_and_follows_the_strongest_channel() -> None:
    rgb = np.zeros((1, 3, 12, 12), dtype=np.uint8)
    rgb[0, 1] = _step(at=7)  # the edge is in the green channel only
    out = sketch(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[0, c], sketch(_step(at=7)[None])[0]) for c in range(3))


def test_inverted_twice_is_identity_and_swaps_black_and_white() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 3, 5, 6), dtype=np.uint8)
    assert np.array_equal(inverted(inverted(images)), images)
    assert inverted(np.array([[[0, 255, 100]]], dtype=np.uint8)).tolist() == [[[255, 0, 155]]]


@pytest.mark.parametrize("render", [sketch, inverted])
@pytest.mark.parametrize("shape", [(3, 8, 10), (2, 3, 8, 10), (2, 1, 8, 10)])
def test_renditions_keep_shape_and_dtype_are_deterministic_and_pure(render, shape) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    before = images.copy()
    first, second = render(images), render(images)
    assert first.shape == shape and first.dtype == np.uint8 and np.array_equal(first, second)
    assert np.array_equal(images, before)  # the input is not modified
    assert not np.array_equal(first, images)


@pytest.mark.parametrize("render", [sketch, inverted])
@pytest.mark.parametrize(
    "bad", [np.zeros((2, 4, 4), dtype=np.float32), np.zeros((4, 4), dtype=np.uint8), np.zeros((1, 1, 1, 4, 4), "u1")]
)
def test_renditions_refuse_other_dtypes_and_ranks(render, bad) -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        render(bad)


def _toy(seed: int = 0, per_class: int = 40, classes: int = 4, size: int = 6, noise: float = 90.0):
    """Separable-ish images: each class a bright square in its own spot, plus heavy noise (some errors)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    images = rng.normal(60, noise, size=(len(labels), size, size))
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] += 80
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def test_natural_adversarial_is_what_the_reference_classifier_gets_wrong() -> None:
    train, train_labels = _toy(seed=0)
    held, held_labels = _toy(seed=1)
    classes = (0, 2, 3)
    got = natural_adversarial(train, train_labels, held, held_labels, classes, seed=0)
    # Independently: the same classifier, fitted on the subset's training images, scored on the subset's held-out.
    keep = np.isin(train_labels, classes)
    reference = LogisticRegression(solver="lbfgs", max_iter=200, random_state=0)
    reference.fit(train[keep].reshape(keep.sum(), -1) / 255.0, train_labels[keep])
    pred = reference.predict(held.reshape(len(held), -1) / 255.0)
    expected = [i for i in range(len(held)) if held_labels[i] in classes and pred[i] != held_labels[i]]
    assert got.dtype == np.int64 and got.tolist() == expected
    assert 0 < len(expected) < np.isin(held_labels, classes).sum() / 2  # non-trivial: some errors, not chance
    assert set(held_labels[got].tolist()) <= set(classes)
    assert np.array_equal(natural_adversarial(train, train_labels, held, held_labels, classes, seed=0), got)
    # Accepts channels-first images too.
    got_chw = natural_adversarial(train[:, None], train_labels, held[:, None], held_labels, classes, seed=0)
    assert np.array_equal(got_chw, got)


def test_natural_adversarial_with_no_held_out_image_of_the_classes_is_empty() -> None:
    train, train_labels = _toy(seed=0)
    held, held_labels = _toy(seed=1)
    keep = held_labels == 1
    got = natural_adversarial(train, train_labels, held[keep], held_labels[keep], (0, 2))
    assert got.dtype == np.int64 and got.size == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "train_labels": a["train_labels"][:-1]}, "differ in length"),
        (lambda a: {**a, "labels": a["labels"][:-1]}, "differ in length"),
        (lambda a: {**a, "classes": (0, 9)}, r"classes \[9\] have no training image"),
        (lambda a: {**a, "classes": (1,)}, "at least two"),
        (lambda a: {**a, "classes": (1, 1)}, "without repeats"),
        (lambda a: {**a, "images": a["images"][:, :5]}, "differ in shape"),
        (lambda a: {**a, "images": a["images"].astype(np.float32)}, "uint8 images"),
    ],
)
def test_natural_adversarial_refuses_bad_input(change, message) -> None:
    train, train_labels = _toy(seed=0)
    held, held_labels = _toy(seed=1)
    args = {"train_images": train, "train_labels": train_labels, "images": held, "labels": held_labels}
    args = change({**args, "classes": (0, 1)})
    with pytest.raises(ValueError, match=message):
        natural_adversarial(**args)


def test_registry_marks_each_stand_in_real_or_synthetic() -> None:
    kinds = {s.name: (s.kind, s.classes) for s in ROBUSTNESS_SETS}
    assert kinds == {
        "fresh": ("real", None),
        "sketch": ("synthetic", None),
        "inverted": ("synthetic", None),
        "natural_adversarial": ("real", NATURAL_ADVERSARIAL_CLASSES),
    }
    with pytest.raises(ValueError, match="real' or 'synthetic"):
        RobustnessSet("x", "fake", None, "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without repeats"):
        RobustnessSet("x", "real", (1, 1), "")


def test_natural_adversarial_on_embedded_fashion_mnist() -> None:
    """2,000 training / 500 held-out real images, the default upper-body subset: a non-trivial share is wrong."""
    train, train_labels = (
        read_idx(RAW / "train-images-idx3-ubyte.gz")[:2000],
        read_idx(RAW / "train-labels-idx1-ubyte.gz")[:2000],
    )
    held, held_labels = (
        read_idx(RAW / "t10k-images-idx3-ubyte.gz")[:500],
        read_idx(RAW / "t10k-labels-idx1-ubyte.gz")[:500],
    )
    got = natural_adversarial(train, train_labels, held, held_labels)
    in_subset = np.isin(held_labels, NATURAL_ADVERSARIAL_CLASSES)
    assert set(held_labels[got].tolist()) <= set(NATURAL_ADVERSARIAL_CLASSES)
    assert np.all(np.diff(got) > 0)
    assert 0.05 < len(got) / in_subset.sum() < 0.5
    rendered = sketch(held[got])
    assert rendered.shape == (len(got), 28, 28) and rendered.min() < 64  # garments have edges
