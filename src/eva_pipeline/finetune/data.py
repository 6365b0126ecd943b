"""A fine-tune stage's label space and images: sources combined by class name, a label budget, even subsets.

Sources label their images with integers of their own (Fashion-MNIST 0-9 and Animal-MNIST 0-9 are different classes;
IN-21K and IN-1K folders index different wnid lists), so a stage's classes are the class names of its sources in
order of first appearance, and every image is labelled by the position of its class name there. The same name in two
sources is one class: that is how the IN-1K classes are found inside the IN-21K head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

ClassNames = Mapping[str, Sequence[str]]
"""``{source: class names in label order}``: ingestion's ``class_names`` output."""


def stage_classes(class_names: ClassNames, sources: Sequence[str]) -> list[str]:
    """The classes of ``sources``, each name once, in order of first appearance."""
    unknown = [s for s in sources if s not in class_names]
    if unknown:
        raise ValueError(
            f"source(s) {unknown} have no class names (labelled sources: {sorted(class_names)}); fine-tuning needs "
            "labelled sources of the ingestion block"
        )
    return list(dict.fromkeys(name for s in sources for name in class_names[s]))


def stage_labels(rows: pd.DataFrame, class_names: ClassNames, classes: Sequence[str]) -> np.ndarray:
    """The label of each row in ``classes``: its source's class name looked up by name (int64, row order)."""
    if rows["label"].isna().any():
        raise ValueError(f"{int(rows['label'].isna().sum())} row(s) have no label: fine-tuning needs labelled rows")
    rows = rows.reset_index(drop=True)  # positions, whatever index the caller's frame has
    position = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(rows), dtype=np.int64)
    for source, group in rows.groupby("source", sort=False):
        names = list(class_names[source])
        local = group["label"].to_numpy(dtype=np.int64)
        if local.size and (local.min() < 0 or local.max() >= len(names)):
            raise ValueError(f"source {source!r} has labels outside its {len(names)} class names")
        lookup = np.array([position.get(n, -1) for n in names], dtype=np.int64)
        missing = sorted({names[i] for i in np.unique(local) if lookup[i] < 0})
        if missing:
            raise ValueError(f"classes {missing} of source {source!r} are not among the stage's classes")
        labels[group.index.to_numpy()] = lookup[local]
    return labels


def label_budget(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Positions of the first ``per_class`` items of each label (all with None), in their original order."""
    if per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    rank = pd.Series(labels).groupby(labels).cumcount().to_numpy()
    return np.flatnonzero(rank < per_class).astype(np.int64)


def evenly_spaced(count: int, keep: int | None) -> np.ndarray:
    """``keep`` positions of ``range(count)`` spread evenly (all with None or ``keep >= count``): the same every run."""
    if keep is None or keep >= count:
        return np.arange(count, dtype=np.int64)
    return np.unique(np.linspace(0, count - 1, keep).round().astype(np.int64))
