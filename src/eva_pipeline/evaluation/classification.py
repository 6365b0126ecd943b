"""Scores of a fine-tuned classifier as the EVA paper reports them (image classification and robustness: IN-1K,
IN-V2, ReaL, IN-A, IN-R, Sketch, ObjectNet; EVA-01 ``run_class_finetuning.py`` and ``engine_for_finetuning.py``).

- top-k accuracy from logits;
- IN-A / IN-R: the 1000-way head restricted to the set's 200 classes (the official code masks the head rows by
  wnid; the same rows, in the same order, are timm's ``_info/imagenet_{a,r}_indices.txt``);
- ReaL: a prediction is correct when it is in the image's relabelled set, images with an empty set are skipped
  (timm's ``RealLabelsImagenet``, whose json timm ships);
- the paper's robustness average (top-1 over IN-1K, V2, ReaL, A, R and Sketch: ObjectNet is left out) and its gap,
  IN-1K top-1 minus that average (89.62 - 84.03 = 5.6 for EVA).

Accuracies are fractions in [0, 1]; the average and gap work in whatever unit the inputs share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import torch

#: Name of each subset -> its class-index file in timm's ``timm/data/_info/``.
SUBSET_INDEX_FILES: Mapping[str, str] = {
    "imagenet_a": "imagenet_a_indices.txt",
    "imagenet_r": "imagenet_r_indices.txt",
}
#: The sets the EVA paper averages for its robustness gap, keyed as in the scores passed in.
PAPER_AVERAGE_SETS: tuple[str, ...] = (
    "imagenet",
    "imagenet_v2",
    "imagenet_real",
    "imagenet_a",
    "imagenet_r",
    "imagenet_sketch",
)
_REAL_JSON = "imagenet_real_labels.json"


def _check_logits(logits: torch.Tensor, count: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != count:
        raise ValueError(f"expected logits of shape ({count}, classes), got {tuple(logits.shape)}")


def _top(logits: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    if not ks or min(ks) < 1 or max(ks) > logits.shape[1]:
        raise ValueError(f"k must be in 1..{logits.shape[1]}, got {tuple(ks)}")
    return logits.topk(max(ks), dim=1).indices  # sorted, largest first, as timm's evaluators


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the ``k`` largest logits, for each ``k``."""
    _check_logits(logits, len(targets))
    hits = _top(logits, ks) == targets.reshape(-1, 1)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def load_subset_indices(name: str) -> list[int]:
    """The IN-1K class index of each class of a 200-class subset, in the subset's label order (timm's file)."""
    if name not in SUBSET_INDEX_FILES:
        raise ValueError(f"unknown subset {name!r}; known: {sorted(SUBSET_INDEX_FILES)}")
    text = (resources.files("timm.data") / "_info" / SUBSET_INDEX_FILES[name]).read_text()
    return [int(line) for line in text.split()]


def subset_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, class_indices: Sequence[int], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Top-k over the head's ``class_indices`` columns only; ``targets`` index that subset (0..len - 1)."""
    index = torch.as_tensor(list(class_indices), dtype=torch.long)
    if index.numel() == 0 or index.unique().numel() != index.numel():
        raise ValueError("class_indices must be non-empty and without repeats")
    if int(index.max()) >= logits.shape[-1] or int(index.min()) < 0:
        raise ValueError(f"class_indices reach {int(index.max())}, but the head has {logits.shape[-1]} classes")
    return topk_accuracy(logits[:, index], targets, ks)


def load_real_labels(filenames: Iterable[str], real_json: str | os.PathLike | None = None) -> list[list[int]]:
    """ReaL label sets of IN-1K validation files, by name (``ILSVRC2012_val_00000001.JPEG`` is entry 0 of the json;
    timm's copy by default). An unknown name is an error."""
    if real_json is None:
        raw = (resources.files("timm.data") / "_info" / _REAL_JSON).read_text()
    else:
        raw = Path(real_json).read_text()
    table = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": labels for i, labels in enumerate(json.loads(raw))}
    names = [os.path.basename(f) for f in filenames]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"{len(unknown)} files have no ReaL entry, e.g. {unknown[:3]}")
    return [list(table[n]) for n in names]


def real_accuracy(
    logits: torch.Tensor, real_labels: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of images with a non-empty ReaL set whose top-k predictions include one of its labels."""
    _check_logits(logits, len(real_labels))
    keep = [i for i, labels in enumerate(real_labels) if labels]
    if not keep:
        raise ValueError("every image has an empty ReaL label set: nothing to score")
    top = _top(logits, ks)[keep].tolist()
    sets = [set(real_labels[i]) for i in keep]
    return {k: sum(bool(sets[j] & set(row[:k])) for j, row in enumerate(top)) / len(keep) for k in ks}


def robustness_average(top1: Mapping[str, float], sets: Sequence[str] = PAPER_AVERAGE_SETS) -> float:
    """Mean top-1 over ``sets`` (other keys, such as ObjectNet, are not part of the paper's average)."""
    missing = [s for s in sets if s not in top1]
    if missing or not sets:
        raise ValueError(f"scores missing for {missing or 'every set'}; have {sorted(top1)}")
    return sum(top1[s] for s in sets) / len(sets)


def robustness_gap(
    top1: Mapping[str, float], target: str = "imagenet", sets: Sequence[str] = PAPER_AVERAGE_SETS
) -> float:
    """The paper's gap: ``top1[target]`` minus :func:`robustness_average` (smaller is more robust)."""
    if target not in top1:
        raise ValueError(f"no score for the target set {target!r}; have {sorted(top1)}")
    return top1[target] - robustness_average(top1, sets)
