"""Robustness stand-ins for the EVA paper's robustness table (IN-V2, IN-A, IN-R, Sketch) on small embedded data.

- a fresh test set from the same distribution (IN-V2 idea): real images, already embedded
  (``data/01_raw/fashion_mnist/t10k-fresh-*``); nothing to compute here;
- deterministic renditions of held-out images (Sketch / IN-R idea): :func:`sketch` and :func:`inverted`; synthetic;
- natural adversarial images (IN-A idea): :func:`natural_adversarial` selects the held-out images of a class subset
  that a fixed simple reference classifier gets wrong; real images, selected, scored over that subset.

:data:`ROBUSTNESS_SETS` describes each set, ``kind`` marking it real or synthetic for the table.
Images are uint8 arrays (N, H, W) or (N, C, H, W); renditions return the same shape and dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

#: The reference classifier's fixed settings (natural_adversarial): multinomial logistic regression on pixels / 255.
REFERENCE_SOLVER = "lbfgs"
REFERENCE_MAX_ITER = 200
#: Sobel magnitude -> darkness: a full 0 -> 255 step (|gx| = 4 * 255) maps to black.
_SOBEL_FULL_STEP = 4.0
#: The class subset of the natural-adversarial stand-in: Fashion-MNIST's upper-body garments (T-shirt/top,
#: pullover, coat, shirt), the classes a pixel classifier confuses most, as IN-A keeps 200 hard classes of 1,000.
NATURAL_ADVERSARIAL_CLASSES: tuple[int, ...] = (0, 2, 4, 6)


@dataclass(frozen=True)
class RobustnessSet:
    """One robustness stand-in: ``kind`` is ``"real"`` (real images, possibly selected) or ``"synthetic"``
    (computed from real images); ``classes`` is the label subset it is scored over (None: every class)."""

    name: str
    kind: Literal["real", "synthetic"]
    classes: tuple[int, ...] | None
    description: str

    def __post_init__(self) -> None:
        if self.kind not in ("real", "synthetic"):
            raise ValueError(f"{self.name}: kind must be 'real' or 'synthetic', got {self.kind!r}")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"{self.name}: classes must be None or non-empty without repeats, got {self.classes}")


ROBUSTNESS_SETS: tuple[RobustnessSet, ...] = (
    RobustnessSet("fresh", "real", None, "a fresh test set from the same distribution (IN-V2 idea): t10k-fresh"),
    RobustnessSet("sketch", "synthetic", None, "edge renditions of held-out images, dark on white (Sketch idea)"),
    RobustnessSet("inverted", "synthetic", None, "inverted held-out images, 255 - x (IN-R rendition idea)"),
    RobustnessSet(
        "natural_adversarial",
        "real",
        NATURAL_ADVERSARIAL_CLASSES,
        "held-out images a fixed logistic regression on pixels gets wrong, over a class subset (IN-A idea)",
    ),
)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W) or (N, C, H, W), got {images.dtype} {images.shape}")
    return images


def sketch(images: np.ndarray) -> np.ndarray:
    """Sketch idea: the Sobel gradient magnitude (edge-replicated borders, strongest channel), inverted so that
    strokes are dark on white; a flat image gives pure white (255). Deterministic, same shape and dtype."""
    images = _check_images(images)
    planes = images.astype(np.float64) if images.ndim == 4 else images[:, None].astype(np.float64)
    p = np.pad(planes, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    # 3x3 Sobel: horizontal derivative smoothed vertically (gx), and its transpose (gy).
    gx = (p[..., :-2, 2:] + 2 * p[..., 1:-1, 2:] + p[..., 2:, 2:]) - (
        p[..., :-2, :-2] + 2 * p[..., 1:-1, :-2] + p[..., 2:, :-2]
    )
    gy = (p[..., 2:, :-2] + 2 * p[..., 2:, 1:-1] + p[..., 2:, 2:]) - (
        p[..., :-2, :-2] + 2 * p[..., :-2, 1:-1] + p[..., :-2, 2:]
    )
    magnitude = np.hypot(gx, gy).max(axis=1, keepdims=True) / _SOBEL_FULL_STEP
    out = 255 - np.clip(np.rint(magnitude), 0, 255).astype(np.uint8)
    out = np.broadcast_to(out, planes.shape)
    return np.ascontiguousarray(out if images.ndim == 4 else out[:, 0])


def inverted(images: np.ndarray) -> np.ndarray:
    """IN-R rendition idea (a changed rendering of the same object): 255 - x. Same shape and dtype."""
    return 255 - _check_images(images)


def reference_classifier(seed: int = 0) -> LogisticRegression:
    """The unfitted reference classifier of :func:`natural_adversarial` (fixed solver, iterations and seed)."""
    return LogisticRegression(solver=REFERENCE_SOLVER, max_iter=REFERENCE_MAX_ITER, random_state=seed)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def natural_adversarial(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[int] = NATURAL_ADVERSARIAL_CLASSES,
    seed: int = 0,
) -> np.ndarray:
    """IN-A idea: indices (sorted, int64) into ``images`` of the held-out images of ``classes`` that the reference
    classifier, fitted on the training images of ``classes`` only, gets wrong. Deterministic.

    Raises ValueError for mismatched lengths or image shapes, fewer than two classes, repeats, or a class with no
    training image."""
    train_images, images = _check_images(train_images), _check_images(images)
    train_labels, labels = np.asarray(train_labels).reshape(-1), np.asarray(labels).reshape(-1)
    if len(train_images) != len(train_labels) or len(images) != len(labels):
        raise ValueError(
            f"images and labels differ in length: train {len(train_images)} vs {len(train_labels)}, "
            f"held-out {len(images)} vs {len(labels)}"
        )
    if train_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"train and held-out images differ in shape: {train_images.shape[1:]} vs {images.shape[1:]}")
    classes = [int(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be at least two, without repeats, got {classes}")
    missing = sorted(set(classes) - set(np.unique(train_labels).tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training image")
    train_mask = np.isin(train_labels, classes)
    held_out = np.flatnonzero(np.isin(labels, classes))
    classifier = reference_classifier(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration budget is part of the fixed reference
        classifier.fit(_flat(train_images[train_mask]), train_labels[train_mask])
    if held_out.size == 0:
        return held_out.astype(np.int64)
    wrong = classifier.predict(_flat(images[held_out])) != labels[held_out]
    return held_out[wrong].astype(np.int64)
