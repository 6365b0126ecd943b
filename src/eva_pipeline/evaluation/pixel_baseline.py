"""The sceptic's row of the classification table: a logistic regression on raw pixels, fitted on the target stage's
labelled images (the fine-tunes' label budget) and scored on every evaluation set exactly as a fine-tuned model is.

The same fixed classifier as the natural-adversarial reference (:func:`~eva_pipeline.evaluation.robustness.
reference_classifier`: pixels / 255, lbfgs, 200 iterations). Pixels are read whole and must share one size: a
baseline for small images (the demo's 28 px), not for ImageNet.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from eva_pipeline.evaluation.robustness import reference_classifier
from eva_pipeline.evaluation.sets import RENDITIONS, EvalSet
from eva_pipeline.loader.pixels import load_images


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def set_pixels(eval_set: EvalSet) -> np.ndarray:
    """uint8 (N, C, H, W) of the set's rows in order, rendered as the set says (sketch, inverted)."""
    images = load_images(eval_set.rows, eval_set.root).numpy()
    rendition = eval_set.params.rendition
    return images if rendition == "none" else RENDITIONS[rendition](images)


def fit_linear(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> LogisticRegression:
    """The fixed reference classifier fitted on float features (N, D) and their labels (the model's class order)."""
    classifier = reference_classifier(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration budget is part of the fixed baseline
        classifier.fit(np.asarray(features, dtype=np.float64), np.asarray(labels))
    return classifier


def fit_pixel_baseline(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> LogisticRegression:
    """The classifier fitted on uint8 images (N, C, H, W) and their labels (ints in the model's class order)."""
    return fit_linear(_features(images), labels, seed)


def pixel_logits(classifier: LogisticRegression, images: np.ndarray, num_classes: int) -> torch.Tensor:
    """float32 (N, num_classes) scores of ``images``: the decision function in the model's class order, -inf for a
    class the classifier never saw; refuses images of another size than it was fitted on."""
    return linear_logits(classifier, _features(images), num_classes)


def linear_logits(classifier: LogisticRegression, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """float32 (N, num_classes) decision function of float ``features`` (N, D) in the model's class order, -inf for a
    class the classifier never saw; refuses features of another width than it was fitted on."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[1] != classifier.n_features_in_:
        raise ValueError(
            f"the pixel baseline was fitted on {classifier.n_features_in_} values per item, these have "
            f"{features.shape[1]}: every set must have the training items' size"
        )
    scores = classifier.decision_function(features)
    if scores.ndim == 1:  # two classes: sklearn returns the second class's margin only
        scores = np.stack([-scores, scores], axis=1)
    out = np.full((len(features), num_classes), -np.inf, dtype=np.float32)
    out[:, classifier.classes_.astype(np.int64)] = scores
    return torch.from_numpy(out)
