"""Classification scores: top-k by hand, IN-A/IN-R subset scoring equal to the official wnid mask, ReaL equal to
timm's ``RealLabelsImagenet`` on a fixture, and the paper's robustness gap from its own numbers."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from timm.data import RealLabelsImagenet

from eva_pipeline.evaluation.classification import (
    PAPER_AVERAGE_SETS,
    load_real_labels,
    load_subset_indices,
    real_accuracy,
    robustness_average,
    robustness_gap,
    subset_accuracy,
    topk_accuracy,
)


def _info(name: str) -> list[str]:
    return (resources.files("timm.data") / "_info" / name).read_text().split()


def test_topk_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.3],  # order 1, 3, 0, 2
            [0.5, 0.1, 0.2, 0.4],  # order 0, 3, 2, 1
            [0.0, 0.1, 0.2, 0.3],  # order 3, 2, 1, 0
        ]
    )
    targets = torch.tensor([1, 3, 0])
    assert topk_accuracy(logits, targets, ks=(1, 2, 4)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: 1.0}
    with pytest.raises(ValueError, match=r"k must be in 1..4"):
        topk_accuracy(logits, targets, ks=(5,))
    with pytest.raises(ValueError, match=r"expected logits of shape \(2, classes\)"):
        topk_accuracy(logits, targets[:2])


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_subset_indices_are_the_sets_classes_in_their_label_order(name: str) -> None:
    """timm's index file picks, in increasing order, the IN-1K classes whose wnids the set holds: the rows the
    official code keeps with its boolean wnid mask, in the order of the set's (sorted) class folders."""
    indices = load_subset_indices(name)
    synsets_1k, synsets_set = _info("imagenet_synsets.txt"), _info(f"{name}_synsets.txt")
    assert len(indices) == 200 and indices == sorted(indices)
    assert [synsets_1k[i] for i in indices] == synsets_set == sorted(synsets_set)
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([w in set(synsets_set) for w in synsets_1k])  # EVA-01 imagenet_a_r_indices.py
    assert torch.equal(logits[:, mask], logits[:, indices])


def test_subset_scoring_by_hand() -> None:
    """The best class overall lies outside the subset: 1000-way top-1 misses, subset top-1 hits."""
    indices = load_subset_indices("imagenet_a")
    outside = next(i for i in range(1000) if i not in set(indices))
    logits = torch.zeros(2, 1000)
    logits[:, outside] = 10.0
    logits[0, indices[7]] = 5.0  # image 0 is subset class 7
    logits[1, indices[3]] = 5.0  # image 1 is subset class 9, predicted 3
    logits[1, indices[9]] = 4.0
    targets = torch.tensor([7, 9])
    assert topk_accuracy(logits, torch.tensor([indices[7], indices[9]]), ks=(1,)) == {1: 0.0}
    assert subset_accuracy(logits, targets, indices, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="without repeats"):
        subset_accuracy(logits, targets, [1, 1, 2])
    with pytest.raises(ValueError, match="head has 1000 classes"):
        subset_accuracy(logits, targets, [5, 1000])


@pytest.fixture
def real_fixture(tmp_path: Path) -> tuple[Path, list[str], list[list[int]]]:
    labels = [[], [3, 7], [1], [], [0, 2, 9], [5], [8], [4, 6], [2], [1, 3]]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(labels))
    filenames = [f"/data/val/n0000/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(labels))]
    return path, filenames, labels


def test_real_accuracy_equals_timms_evaluator(real_fixture) -> None:
    path, filenames, labels = real_fixture
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(3))
    timm_real = RealLabelsImagenet(filenames, real_json=str(path), topk=(1, 5))
    timm_real.add_result(logits[:4])  # in two batches, as an eval loop feeds it
    timm_real.add_result(logits[4:])
    ours = real_accuracy(logits, load_real_labels(filenames, path))
    assert {k: v * 100 for k, v in ours.items()} == pytest.approx(timm_real.get_accuracy())
    assert 0.0 < ours[1] < ours[5] < 1.0  # a fixture that tells the two k apart


def test_real_accuracy_by_hand() -> None:
    """Image 1 has an empty set and is skipped; image 0 is right with its second label, image 2 wrong at top-1."""
    logits = torch.tensor([[0.0, 0.1, 0.9], [0.9, 0.0, 0.0], [0.0, 0.9, 0.5]])
    real = [[1, 2], [], [2]]
    assert real_accuracy(logits, real, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="empty ReaL label set"):
        real_accuracy(logits, [[], [], []])


def test_real_labels_from_timms_json() -> None:
    names = ["ILSVRC2012_val_00000001.JPEG", "x/ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00050000.JPEG"]
    table = RealLabelsImagenet([f"{i}" for i in range(50000)]).real_labels
    assert load_real_labels(names) == [table[n.split("/")[-1]] for n in names]
    assert load_real_labels(names)[:2] == [[], [970, 795]]
    with pytest.raises(ValueError, match="no ReaL entry"):
        load_real_labels(["ILSVRC2012_val_00050001.JPEG"])


def test_robustness_gap_from_the_papers_numbers() -> None:
    """EVA-g at 336 px: 89.62 on IN-1K and an average of 84.03 over the six sets -> a gap of 5.6 points."""
    top1 = {
        "imagenet": 89.62,
        "imagenet_v2": 81.57,
        "imagenet_real": 90.83,
        "imagenet_a": 86.15,
        "imagenet_r": 88.28,
        "imagenet_sketch": 67.72,
        "objectnet": 60.91,  # reported, but not in the average
    }
    assert robustness_average(top1) == pytest.approx(504.17 / 6)
    assert round(robustness_average(top1), 2) == 84.03
    assert robustness_gap(top1) == pytest.approx(89.62 - 504.17 / 6) and round(robustness_gap(top1), 1) == 5.6
    assert robustness_gap(top1, sets=(*PAPER_AVERAGE_SETS, "objectnet")) == pytest.approx(89.62 - 565.08 / 7)
    with pytest.raises(ValueError, match=r"scores missing for \['imagenet_sketch'\]"):
        robustness_gap({k: v for k, v in top1.items() if k != "imagenet_sketch"})
