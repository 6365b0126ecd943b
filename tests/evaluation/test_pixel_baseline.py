"""The raw-pixel row of the classification table: scores in the model's class order (a class the baseline never saw
can never be predicted), the same predictions as scikit-learn's, and a clear error for images of another size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eva_pipeline.evaluation.pixel_baseline import fit_pixel_baseline, pixel_logits


def _images(labels: np.ndarray, size: int = 6) -> np.ndarray:
    """Class k lights up row k of the image, plus noise: linearly separable, deterministic."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, size=(len(labels), 1, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 0, label] = 255
    return images


def test_scores_follow_the_model_classes_and_match_sklearn() -> None:
    labels = np.array([0, 2, 3] * 10)  # class 1 has no training image
    classifier = fit_pixel_baseline(_images(labels), labels)
    test_labels = np.array([3, 0, 2, 2])
    images = _images(test_labels)
    logits = pixel_logits(classifier, images, num_classes=5)
    assert logits.shape == (4, 5)
    assert torch.isneginf(logits[:, [1, 4]]).all()  # never seen: never predicted
    assert logits.argmax(dim=1).tolist() == classifier.predict(images.reshape(4, -1) / 255.0).tolist()
    assert logits.argmax(dim=1).tolist() == test_labels.tolist()


def test_two_classes_give_two_columns() -> None:
    labels = np.array([0, 1] * 8)
    classifier = fit_pixel_baseline(_images(labels), labels)
    logits = pixel_logits(classifier, _images(np.array([1, 0])), num_classes=2)
    assert logits.argmax(dim=1).tolist() == [1, 0]


def test_images_of_another_size_are_refused() -> None:
    labels = np.array([0, 1, 2] * 4)
    classifier = fit_pixel_baseline(_images(labels), labels)
    with pytest.raises(ValueError, match="fitted on 36 values per item, these have 64"):
        pixel_logits(classifier, _images(np.array([0]), size=8), num_classes=3)
