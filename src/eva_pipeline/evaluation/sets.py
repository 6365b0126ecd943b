"""The evaluation sets of the classification table (the EVA paper's IN-1K, V2, ReaL, A, R, Sketch and ObjectNet, or
their stand-ins), each built from one :class:`~eva_pipeline.config.EvalSetParams`, then run through a fine-tuned
classifier and scored.

- **Rows** (:func:`select_set_rows`): the manifest rows of the set's sources, of its ``classes`` only when given,
  the natural-adversarial ones when asked (:func:`~eva_pipeline.evaluation.robustness.natural_adversarial`), then
  ``max_images`` evenly spaced ones (a class-sorted source keeps every class).
- **Labels** (:func:`label_set`): for each row the model-class indices that count as correct, by class NAME (a
  row's class is ``class_names[source][label]``, so sources with label spaces of their own meet the model's
  classes): its own class, its ReaL set (timm's json, by file name; an empty set is not scored), or the model
  classes its set class maps to (ObjectNet-style ``class_map``); and the head columns scored: ``classes`` or, with
  ``score_over_set_classes``, the classes of the set's images (IN-A/IN-R: 200 of 1,000), else all.
- **Logits** (:func:`set_logits`): streamed through the classification loader, the rendition (sketch, inverted)
  applied to the uint8 pixels before the evaluation transform, which is an argument (``finetune`` sits beside
  ``evaluation`` in the layers: the node passes ``finetune.augment.eval_transform(size, crop_pct)``).
- **Scores** (:func:`score_set`): top-k over the scored columns, correct when any of the k is in the row's set.

Memory: rows and their label sets are held (small); pixels are streamed a batch at a time, so a 50,000-image IN-1K
val costs one batch. The one exception is the natural-adversarial selection: the reference classifier predicts
every candidate (the set's rows of its classes) at once, so their pixels are read together, as is the reference's
own training set (:func:`natural_adversarial_reference`): a stand-in for small images, not for ImageNet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from eva_pipeline.config import EvalSetParams
from eva_pipeline.evaluation.classification import load_real_labels
from eva_pipeline.evaluation.robustness import inverted, natural_adversarial, sketch
from eva_pipeline.loader.classification import ClassificationDataset, Transform, classification_loader
from eva_pipeline.loader.heldout import validation_rows
from eva_pipeline.loader.pixels import ManifestPixels, load_images, split_location
from eva_pipeline.loader.rows import FrameRows

#: Each rendition of ``EvalSetParams.rendition``: uint8 (N, C, H, W) -> the same shape, applied before the transform.
RENDITIONS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {"sketch": sketch, "inverted": inverted}
#: Class names shown in an error message before "...".
_SHOWN = 20


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in items[:_SHOWN])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")


@dataclass(frozen=True)
class NaturalAdversarialReference:
    """The reference classifier's training images, uint8 (N, [C,] H, W), and their labels, ints in the label space
    of the natural-adversarial set's sources (the space its ``classes`` are mapped to; -1: another class)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, eq=False)
class SetRows:
    """The selected rows of one set (index reset), before labelling for a model. ``set_classes``: the set's class
    names before the ``max_images`` subsample (``classes`` when given), so that the scored subset is a property of
    the set, not of how many of its images are evaluated; ``candidates``: the rows before that subsample."""

    params: EvalSetParams
    rows: pd.DataFrame
    set_classes: tuple[str, ...]
    candidates: int
    root: Path | None = None


@dataclass(frozen=True, eq=False)
class EvalSet:
    """One set labelled for a model whose head has ``model_classes`` (in row order). ``correct[i]``: the model-class
    indices counted correct for row ``i`` (empty: not scored, ReaL); ``scored_classes``: the head columns the
    prediction is restricted to (None: every class). ``root``: what relative locations resolve against."""

    params: EvalSetParams
    rows: pd.DataFrame
    model_classes: tuple[str, ...]
    correct: tuple[tuple[int, ...], ...]
    scored_classes: tuple[int, ...] | None
    root: Path | None = None

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def in_average(self) -> bool:
        return self.params.in_average

    @property
    def scored_images(self) -> int:
        """Rows with a non-empty correct set: the images :func:`score_set` counts."""
        return sum(1 for c in self.correct if c)

    @property
    def num_scored_classes(self) -> int:
        return len(self.model_classes) if self.scored_classes is None else len(self.scored_classes)

    def describe(self) -> dict[str, Any]:
        """The set's entry of the report's JSON: kind, images scored, classes scored, whether it is averaged."""
        return {
            "kind": self.kind,
            "images": self.scored_images,
            "scored_classes": self.num_scored_classes,
            "in_average": self.in_average,
        }


# ------------------------------------------------------------------------------------------------------ rows
def row_class_names(rows: pd.DataFrame, class_names: Mapping[str, Sequence[str]]) -> pd.Series:
    """Each row's class name, ``class_names[source][label]`` (same index as ``rows``); a source without names, a
    missing label or a label past its source's names is an error."""
    out = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for source, group in rows.groupby("source", sort=False):
        if source not in class_names:
            raise ValueError(f"source {source!r} has no class names (known: {sorted(class_names)})")
        if group["label"].isna().any():
            raise ValueError(f"source {source!r}: {int(group['label'].isna().sum())} row(s) have no label")
        labels = group["label"].to_numpy(dtype=np.int64)
        names = np.asarray(list(class_names[source]), dtype=object)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"source {source!r}: labels reach {labels.max()} but it has {len(names)} class names")
        out.loc[group.index] = names[labels]
    return out


def _label_space(params: EvalSetParams, class_names: Mapping[str, Sequence[str]]) -> list[str]:
    """The one label space of a natural-adversarial set's sources (the reference classifier predicts its ints)."""
    if missing := [s for s in params.sources if s not in class_names]:
        raise ValueError(f"sources {missing} have no class names (known: {sorted(class_names)})")
    spaces = {tuple(class_names[s]) for s in params.sources}
    if len(spaces) != 1:
        raise ValueError(f"set {params.name!r}: natural_adversarial needs sources that share one label space")
    return list(spaces.pop())


def _adversarial_classes(params: EvalSetParams, space: list[str]) -> list[int]:
    return [space.index(c) for c in params.classes] if params.classes is not None else list(range(len(space)))


def _stacked(pixels: list[torch.Tensor], what: str) -> np.ndarray:
    shapes = sorted({tuple(p.shape) for p in pixels})
    if len(shapes) > 1:
        raise ValueError(f"{what}: images of one size are needed to select them together, found (C, H, W) {shapes}")
    return torch.stack(pixels).numpy()


def select_set_rows(
    params: EvalSetParams,
    rows: pd.DataFrame,
    class_names: Mapping[str, Sequence[str]],
    *,
    default_max_images: int | None,
    reference: NaturalAdversarialReference | None = None,
    root: str | Path | None = None,
    seed: int = 0,
) -> SetRows:
    """The rows of the set: its sources (any split), its ``classes``, the natural-adversarial selection (the
    candidates that a reference classifier fitted on ``reference`` gets wrong; their pixels read at once), then
    ``params.max_images`` (else ``default_max_images``; None: all) evenly spaced rows, in manifest order."""
    present = set(rows["source"].unique())
    if missing := [s for s in params.sources if s not in present]:
        raise ValueError(f"set {params.name!r}: sources {missing} have no rows in the manifest")
    frame = rows[rows["source"].isin(params.sources)].reset_index(drop=True)
    names = row_class_names(frame, class_names)
    if params.classes is not None:
        known = {n for s in params.sources for n in class_names[s]}
        if unknown := [c for c in params.classes if c not in known]:
            raise ValueError(f"set {params.name!r}: classes {_names(unknown)} are not classes of {params.sources}")
        keep = names.isin(params.classes).to_numpy()
        frame, names = frame[keep].reset_index(drop=True), names[keep].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"set {params.name!r} has no images (sources {params.sources}, classes {params.classes})")
    if params.natural_adversarial:
        if reference is None:
            raise ValueError(f"set {params.name!r} is natural_adversarial: give the reference classifier's images")
        space = _label_space(params, class_names)
        images = _stacked(ManifestPixels(FrameRows(frame), root=root)(np.arange(len(frame))), f"set {params.name!r}")
        labels = frame["label"].to_numpy(dtype=np.int64)
        chosen = natural_adversarial(
            reference.images, reference.labels, images, labels, _adversarial_classes(params, space), seed=seed
        )
        if chosen.size == 0:
            raise ValueError(f"set {params.name!r}: the reference classifier gets every candidate right")
        frame, names = frame.iloc[chosen].reset_index(drop=True), names.iloc[chosen].reset_index(drop=True)
    set_classes = tuple(params.classes) if params.classes is not None else tuple(dict.fromkeys(names.tolist()))
    candidates = len(frame)
    limit = params.max_images if params.max_images is not None else default_max_images
    if limit is not None:
        frame = frame.iloc[validation_rows(len(frame), limit)].reset_index(drop=True)
    return SetRows(params, frame, set_classes, candidates, None if root is None else Path(root))


def natural_adversarial_reference(
    params: EvalSetParams,
    rows: pd.DataFrame,
    sources: Sequence[str],
    class_names: Mapping[str, Sequence[str]],
    root: str | Path | None = None,
) -> NaturalAdversarialReference:
    """The reference classifier's training images for a natural-adversarial set: the rows of ``sources``
    (``ClassificationEvalParams.reference_sources``) of the set's classes, read whole, labelled by name in the
    set's label space."""
    space = _label_space(params, class_names)
    wanted = set(params.classes) if params.classes is not None else set(space)
    frame = rows[rows["source"].isin(list(sources))].reset_index(drop=True)
    if missing := [s for s in sources if s not in set(frame["source"])]:
        raise ValueError(f"reference sources {missing} have no rows in the manifest")
    names = row_class_names(frame, class_names)
    keep = names.isin(wanted).to_numpy()
    frame, names = frame[keep].reset_index(drop=True), names[keep]
    if frame.empty:
        raise ValueError(f"reference sources {list(sources)} have no image of the classes of set {params.name!r}")
    labels = np.asarray([space.index(n) for n in names], dtype=np.int64)
    return NaturalAdversarialReference(load_images(frame, root).numpy(), labels)


# ---------------------------------------------------------------------------------------------------- labels
def _load_class_map(path: Path) -> dict[str, list[str]]:
    mapping = json.loads(Path(path).read_text())
    if not isinstance(mapping, dict) or not all(
        isinstance(v, list) and all(isinstance(m, str) for m in v) for v in mapping.values()
    ):
        raise ValueError(f"class_map {path}: expected a JSON object {{set class: [model class names]}}")
    return mapping


def file_name(location: str) -> str:
    """The file name of a row's image (a container member's own name): what ReaL's json is keyed by."""
    path, member = split_location(location)
    return os.path.basename(member if member is not None else path)


def label_set(set_rows: SetRows, class_names: Mapping[str, Sequence[str]], model_classes: Sequence[str]) -> EvalSet:
    """The set labelled for a head with ``model_classes`` (by name). A class the set needs but the model lacks is
    an error naming them (map them with ``class_map``); so is a set class missing from the ``class_map``."""
    params, rows = set_rows.params, set_rows.rows
    model_classes = tuple(model_classes)
    index = {name: i for i, name in enumerate(model_classes)}
    if len(index) != len(model_classes):
        raise ValueError(f"the model's classes repeat names ({len(model_classes) - len(index)} repeats)")
    if params.real_labels is not None and params.class_map is not None:
        raise ValueError(f"set {params.name!r}: give real_labels or class_map, not both")
    names = row_class_names(rows, class_names).tolist()
    mapping = _load_class_map(params.class_map) if params.class_map is not None else None
    if mapping is not None and (unmapped := sorted({*names, *set_rows.set_classes} - set(mapping))):
        raise ValueError(
            f"set {params.name!r}: classes {_names(unmapped)} are not in class_map {params.class_map} "
            "(list the mapped ones in `classes`)"
        )

    def targets(name: str) -> list[str]:
        return mapping[name] if mapping is not None else [name]

    real: list[list[str]] | None = None
    if params.real_labels is not None:
        ints = load_real_labels([file_name(loc) for loc in rows["location"]], params.real_labels)
        real = []
        for source, labels in zip(rows["source"], ints, strict=True):
            space = class_names[source]
            if any(j >= len(space) for j in labels):
                raise ValueError(f"set {params.name!r}: ReaL labels reach past the {len(space)} classes of {source!r}")
            real.append([space[j] for j in labels])
    groups = real if real is not None else [targets(n) for n in names]
    scoped = params.classes is not None or params.score_over_set_classes
    subset = [m for c in set_rows.set_classes for m in targets(c)] if scoped else []
    if missing := sorted({m for group in groups for m in group}.union(subset) - set(index)):
        raise ValueError(
            f"set {params.name!r}: classes {_names(missing)} are not among the model's {len(model_classes)} "
            "classes (map the set's classes to the model's with class_map)"
        )
    correct = tuple(tuple(sorted({index[m] for m in group})) for group in groups)
    scored = tuple(sorted({index[m] for m in subset})) if scoped else None
    if scored is not None and not scored:
        raise ValueError(f"set {params.name!r}: no model class to score over")
    return EvalSet(params, rows, model_classes, correct, scored, set_rows.root)


def build_eval_set(
    params: EvalSetParams,
    rows: pd.DataFrame,
    class_names: Mapping[str, Sequence[str]],
    model_classes: Sequence[str],
    *,
    default_max_images: int | None,
    reference: NaturalAdversarialReference | None = None,
    root: str | Path | None = None,
    seed: int = 0,
) -> EvalSet:
    """:func:`select_set_rows` then :func:`label_set` (select once and label per model when runs share the rows)."""
    selected = select_set_rows(
        params, rows, class_names, default_max_images=default_max_images, reference=reference, root=root, seed=seed
    )
    return label_set(selected, class_names, model_classes)


# -------------------------------------------------------------------------------------------- logits, scores
class RenderedPixels:
    """A pixel source whose images are passed through ``render`` (uint8 (N, C, H, W) -> same) as they are read
    (picklable: a DataLoader worker gets a copy)."""

    def __init__(self, pixels: Any, render: Callable[[np.ndarray], np.ndarray]) -> None:
        self.pixels, self.render = pixels, render

    def __len__(self) -> int:
        return len(self.pixels)

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(np.array(self.render(p.numpy()[None])[0])) for p in self.pixels(indices)]


def set_logits(
    model: torch.nn.Module,
    eval_set: EvalSet,
    transform: Transform,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """float32 CPU logits (N, model classes) of the set's rows in order: pixels streamed in batches, rendered, put
    through ``transform`` (the evaluation one), and ``model`` (already on ``device``; images take the dtype of its
    first floating parameter) in eval mode under ``torch.inference_mode`` (its training mode is restored after)."""
    pixels: Any = ManifestPixels(FrameRows(eval_set.rows), root=eval_set.root)
    if eval_set.params.rendition != "none":
        pixels = RenderedPixels(pixels, RENDITIONS[eval_set.params.rendition])
    count = len(eval_set.rows)
    dataset = ClassificationDataset(pixels, np.arange(count), transform)  # the label is the row: order checked
    loader = classification_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    outputs: list[torch.Tensor] = []
    done, was_training = 0, model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=count, unit="img", desc=f"eval {eval_set.name}", disable=not progress) as bar,
        ):
            for images, positions in loader:
                if not torch.equal(positions, torch.arange(done, done + len(positions))):
                    raise RuntimeError(f"set {eval_set.name!r}: the loader returned rows out of order")
                logits = model(images.to(device=device, dtype=dtype))
                if logits.ndim != 2 or logits.shape[1] != len(eval_set.model_classes):
                    raise ValueError(
                        f"the model returns {tuple(logits.shape)} logits for {len(eval_set.model_classes)} classes"
                    )
                outputs.append(logits.float().cpu())
                done += len(positions)
                bar.update(len(positions))
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros((0, len(eval_set.model_classes)))


def score_set(logits: torch.Tensor, eval_set: EvalSet, ks: Sequence[int] = (1, 5)) -> dict[str, float | int]:
    """``{"top1": .., "top5": .., "images": n}``: the fraction of scored rows (non-empty correct set) whose ``k``
    largest logits over the scored columns include a correct class; ``k`` is clipped to the scored classes."""
    if logits.ndim != 2 or logits.shape != (len(eval_set.rows), len(eval_set.model_classes)):
        raise ValueError(
            f"expected logits ({len(eval_set.rows)}, {len(eval_set.model_classes)}), got {tuple(logits.shape)}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {tuple(ks)}")
    keep = [i for i, c in enumerate(eval_set.correct) if c]
    if not keep:
        raise ValueError(f"set {eval_set.name!r}: every image has an empty correct set, nothing to score")
    columns = None if eval_set.scored_classes is None else torch.as_tensor(eval_set.scored_classes)
    scored = logits if columns is None else logits[:, columns]
    top = scored[keep].topk(min(max(ks), scored.shape[1]), dim=1).indices  # sorted, largest first
    top = (top if columns is None else columns[top]).tolist()
    result: dict[str, float | int] = {}
    for k in ks:
        hits = sum(bool(set(eval_set.correct[i]) & set(row[:k])) for i, row in zip(keep, top, strict=True))
        result[f"top{k}"] = hits / len(keep)
    result["images"] = len(keep)
    return result
