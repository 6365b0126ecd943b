"""Linear probe on frozen features: the demo's measure of what pre-training taught the encoder.

The same probe (standardise, then multinomial logistic regression from scikit-learn) is fitted on the features of
the pre-trained student, of the same architecture at random init, and of the teacher; only the features differ,
so the top-1 accuracies are comparable. The split is stratified and seeded so every run and every encoder sees the
very same probe-train / probe-test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

_MIN_PER_CLASS = 2  # a stratified split needs one example of each class on each side


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probe split, the classifier and the feature extraction feeding it.

    ``C`` is the inverse L2 strength of the logistic regression; ``max_iter``/``tol`` bound lbfgs. ``standardize``
    z-scores features with train statistics first, which lbfgs needs to converge on raw ViT tokens.
    ``batch_size`` is the default batch of :func:`~eva_pipeline.evaluation.features.extract_features`.
    """

    test_fraction: float = 0.4
    seed: int = 0
    max_iter: int = 1000
    C: float = 1.0
    tol: float = 1e-4
    standardize: bool = True
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


DEFAULT_PROBE_CONFIG = ProbeConfig()


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return labels


def split_probe(labels: np.ndarray, cfg: ProbeConfig = DEFAULT_PROBE_CONFIG) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint (train_idx, test_idx) covering every row, stratified by label and fixed by ``cfg.seed``.

    Stratification keeps the class balance of both parts equal to the whole, so a probe's accuracy is not
    shifted by which classes happened to land in the test part.
    """
    labels = _check_labels(labels, "labels")
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"labels hold a single class ({classes[0]!r}); a probe needs at least two")
    if counts.min() < _MIN_PER_CLASS:
        rare = classes[counts < _MIN_PER_CLASS].tolist()
        raise ValueError(f"classes {rare} have fewer than {_MIN_PER_CLASS} examples; cannot stratify the split")
    index = np.arange(labels.shape[0])
    train_idx, test_idx = train_test_split(
        index, test_size=cfg.test_fraction, random_state=cfg.seed, shuffle=True, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {features.shape}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} features are empty (0 rows)")
    if features.shape[1] == 0:
        raise ValueError(f"{name} features have 0 dimensions")
    if not np.issubdtype(features.dtype, np.number) or np.issubdtype(features.dtype, np.complexfloating):
        raise ValueError(f"{name} features must be real numbers, got dtype {features.dtype}")
    bad = int(np.count_nonzero(~np.isfinite(features)))
    if bad:
        raise ValueError(f"{name} features contain {bad} NaN/inf values")
    return features


def build_probe(cfg: ProbeConfig = DEFAULT_PROBE_CONFIG) -> Pipeline:
    """The unfitted classifier: (StandardScaler) + LogisticRegression (lbfgs; multinomial for >2 classes)."""
    classifier = LogisticRegression(C=cfg.C, solver="lbfgs", max_iter=cfg.max_iter, tol=cfg.tol, random_state=cfg.seed)
    return make_pipeline(StandardScaler(), classifier) if cfg.standardize else make_pipeline(classifier)


def linear_probe_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: ProbeConfig = DEFAULT_PROBE_CONFIG,
) -> float:
    """Top-1 accuracy on (test_x, test_y) of a linear classifier fitted on (train_x, train_y).

    Inputs are checked first so a broken encoder (NaN features) or a mis-joined split fails here with a message
    naming the problem, not deep inside scikit-learn.
    """
    train_x = _check_features(train_x, "train")
    test_x = _check_features(test_x, "test")
    train_y = _check_labels(train_y, "train labels")
    test_y = _check_labels(test_y, "test labels")
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"length mismatch: {train_x.shape[0]} train features vs {train_y.shape[0]} train labels")
    if test_x.shape[0] != test_y.shape[0]:
        raise ValueError(f"length mismatch: {test_x.shape[0]} test features vs {test_y.shape[0]} test labels")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature width mismatch: train has {train_x.shape[1]} dims, test has {test_x.shape[1]}")
    classes = np.unique(train_y)
    if classes.size < 2:
        raise ValueError(f"train labels hold a single class ({classes[0]!r}); a probe needs at least two")
    probe = build_probe(cfg).fit(train_x, train_y)
    return float(np.mean(probe.predict(test_x) == test_y))
