"""A stage's label space by class name, the label budget, even subsets, and the sharded / resumed epoch order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from eva_pipeline.finetune.data import evenly_spaced, label_budget, stage_classes, stage_labels
from eva_pipeline.finetune.weights import stage_classifier
from eva_pipeline.loader.classification import ClassificationDataset, classification_loader

NAMES = {"clothes": ["shirt", "bag", "boot"], "animals": ["cat", "bag", "dog"]}


def _rows(pairs: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"source": [s for s, _ in pairs], "label": pd.array([lab for _, lab in pairs], dtype="Int64")},
        index=[10 + i for i in range(len(pairs))],  # a caller's index is not a position
    )


def test_classes_combine_by_name_in_order_of_first_appearance() -> None:
    assert stage_classes(NAMES, ["clothes", "animals"]) == ["shirt", "bag", "boot", "cat", "dog"]
    assert stage_classes(NAMES, ["animals"]) == ["cat", "bag", "dog"]
    with pytest.raises(ValueError, match=r"\['tools'\]"):
        stage_classes(NAMES, ["clothes", "tools"])


def test_labels_are_positions_of_the_class_names() -> None:
    classes = stage_classes(NAMES, ["clothes", "animals"])
    rows = _rows([("clothes", 1), ("animals", 1), ("animals", 0), ("clothes", 2), ("animals", 2)])
    assert stage_labels(rows, NAMES, classes).tolist() == [1, 1, 3, 2, 4]  # "bag" is one class in both sources


def test_a_class_outside_the_stage_or_a_bad_label_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\['dog'\]"):
        stage_labels(_rows([("animals", 2)]), NAMES, ["cat", "bag"])
    with pytest.raises(ValueError, match="outside its 3 class names"):
        stage_labels(_rows([("animals", 3)]), NAMES, ["cat", "bag", "dog"])
    rows = _rows([("animals", 0)])
    rows.loc[10, "label"] = pd.NA
    with pytest.raises(ValueError, match="no label"):
        stage_labels(rows, NAMES, ["cat"])


def test_label_budget_keeps_the_first_k_of_each_class_in_order() -> None:
    labels = np.array([0, 1, 0, 0, 2, 1, 0, 2])
    assert label_budget(labels, 2).tolist() == [0, 1, 2, 4, 5, 7]
    assert label_budget(labels, None).tolist() == list(range(8))


def test_evenly_spaced_is_deterministic_and_spans_the_range() -> None:
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9] or evenly_spaced(10, 3).tolist() == [0, 5, 9]
    assert evenly_spaced(5, None).tolist() == evenly_spaced(5, 9).tolist() == [0, 1, 2, 3, 4]


def _order(loader) -> list[int]:
    return [int(i) for _, labels in loader for i in labels]


def test_ranks_share_each_global_batch_and_a_resume_skips_whole_batches() -> None:
    images = torch.zeros(22, 1, 4, 4, dtype=torch.uint8)
    data = ClassificationDataset(images, torch.arange(22), lambda im: torch.zeros(1))
    whole = _order(classification_loader(data, 6, shuffle=True, seed=3, epoch=1))
    assert len(whole) == 18  # three full global batches
    ranks = [_order(classification_loader(data, 6, shuffle=True, seed=3, epoch=1, rank=r, world=2)) for r in (0, 1)]
    merged = [i for b in range(3) for r in (0, 1) for i in ranks[r][3 * b : 3 * b + 3]]
    assert merged == whole
    tail = _order(classification_loader(data, 6, shuffle=True, seed=3, epoch=1, start_batch=2))
    assert tail == whole[12:]
    with pytest.raises(ValueError, match="training loaders"):
        classification_loader(data, 6, shuffle=False, start_batch=1)


def test_an_image_size_the_patch_does_not_divide_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"img_size 30 is not divisible by the patch size 4.*28 or 32"):
        stage_classifier("eva_tiny_patch4_28", {}, 10, 30, drop_path_rate=0.1)
    model = stage_classifier("eva_tiny_patch4_28", {"drop_path_rate": 0.0, "img_size": 28}, 10, 56, drop_path_rate=0.2)
    assert model.config.img_size == 56 and model.config.drop_path_rate == 0.2 and model.num_classes == 10
