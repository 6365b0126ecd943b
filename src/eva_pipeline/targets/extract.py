"""Teacher-target extraction, in the Kedro process or as one of several ranks: ``python -m
eva_pipeline.targets.extract <run.json>``.

The teacher_targets node writes one frozen :class:`ExtractSpec` and, for ``world_size > 1``, starts a rank per GPU
through the DeepSpeed launcher or torch elastic (:mod:`eva_pipeline.runtime.launch`). Each rank streams the images
of its own shards from the manifest (shard ``s`` belongs to rank ``s % world_size``), runs the teacher on its device
and writes them; a killed extraction resumes with only the missing shards, with any number of ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eva_pipeline.config import AugmentationParams, TeacherParams
from eva_pipeline.loader.augment import RandomResizedCropFlip, view_rng
from eva_pipeline.loader.heldout import SubsetPixels, validation_pixels
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import ParquetRows
from eva_pipeline.loader.transforms import resize_uint8, stack_images
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.runtime.launch import RunFile
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.teachers import create_teacher


@dataclass(frozen=True)
class ExtractSpec(RunFile):
    """Everything a rank needs, as plain JSON."""

    manifest: str  # Parquet whose `split` rows, in order, are the items
    store: str
    fingerprint: dict[str, Any]
    teacher: dict[str, Any]  # TeacherParams
    device: str
    img_size: int
    grid: int
    views_per_item: int  # 0: the whole image, one row per image
    augmentation: dict[str, Any]  # AugmentationParams (used when views_per_item >= 1)
    seed: int
    shard_size: int
    batch_size: int
    split: str = "pretrain"  # the manifest split whose rows are the items
    num_images: int = 0  # > 0: only that many evenly spaced rows of the split (the validation set)


def item_pixels(rows: Any, num_images: int = 0) -> ManifestPixels | SubsetPixels:
    """The store's items: every row of the split, or its ``num_images`` evenly spaced validation rows."""
    return validation_pixels(rows, num_images) if num_images else ManifestPixels(rows)


def extract(spec: ExtractSpec, rank: int = 0, world_size: int = 1, rows: Any = None, progress: bool = True) -> Path:
    """Compute this rank's shards of the store (all of them with one rank); returns the store folder.

    ``rows``: the rows of ``spec.split`` as a :class:`~eva_pipeline.loader.rows.RowSource` (default: streamed from
    ``spec.manifest``).
    """
    store = TargetStore(spec.store)
    if store.is_complete(spec.fingerprint):  # nothing to do: not even the teacher is built
        return store.root
    device = resolve_device(spec.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    teacher_params = TeacherParams.model_validate(spec.teacher)
    teacher = create_teacher(teacher_params.kind, **{"device": str(device), **teacher_params.options})
    aug = AugmentationParams.model_validate(spec.augmentation)
    augment = RandomResizedCropFlip(spec.img_size, aug.scale, aug.ratio, aug.flip_prob) if spec.views_per_item else None
    pixels = item_pixels(rows if rows is not None else ParquetRows(spec.manifest, spec.split), spec.num_images)
    grid = (spec.grid, spec.grid)
    return store.compute(
        spec.fingerprint,
        num_items=len(pixels),
        batch_fn=teacher_views(pixels, spec.img_size, spec.views_per_item, augment, spec.seed),
        teacher_fn=lambda x: teacher.targets(x.to(device), grid),
        shard_size=spec.shard_size,
        batch_size=spec.batch_size,
        views_per_item=max(spec.views_per_item, 1),
        rank=rank,
        world_size=world_size,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if len(args) != 1:
        raise SystemExit("usage: python -m eva_pipeline.targets.extract <run.json>")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    extract(ExtractSpec.read(Path(args[0])), rank, world)


def teacher_views(
    pixels: Any, img_size: int, views_per_item: int, augment: RandomResizedCropFlip | None, seed: int
) -> Any:
    """``batch_fn`` of target extraction: store rows ``[start, stop)`` -> model input (and crops).

    ``views_per_item`` 0: one row per image, the whole image resized (no crops stored). K >= 1: row ``i*K + k`` is
    view ``k`` of image ``i``, drawn from ``view_rng(seed, k, i)``, the view the ``augment`` loader mode draws in
    epoch ``k``; its crop is returned with the input so that training reads exactly what the teacher saw.
    """
    from eva_pipeline.loader.augment import views_to_crops
    from eva_pipeline.loader.transforms import to_model_input
    from eva_pipeline.targets.layout import items_and_views

    if views_per_item < 0 or (views_per_item and augment is None):
        raise ValueError(f"views_per_item must be 0, or >= 1 with an augmentation; got {views_per_item}")

    def batch_fn(start: int, stop: int) -> Any:
        if views_per_item == 0:
            images = [resize_uint8(im, img_size) for im in pixels(np.arange(start, stop))]
            return to_model_input(stack_images(images), img_size)
        items, views = items_and_views(start, stop, views_per_item)
        unique, inverse = np.unique(items, return_inverse=True)  # each image decoded once for its K views
        decoded = pixels(unique)
        chosen = [
            augment.sample(decoded[j].shape[-2], decoded[j].shape[-1], view_rng(seed, int(k), int(i)))
            for j, i, k in zip(inverse, items, views, strict=True)
        ]
        crops = [augment.apply(decoded[j], v) for j, v in zip(inverse, chosen, strict=True)]
        return to_model_input(stack_images(crops), img_size), views_to_crops(chosen)

    return batch_fn


if __name__ == "__main__":
    main()
