"""Data: IDX reading, the image manifest and its ingestion (IDX, image folders, file lists, webdataset shards, with
robust decoding that records every rejected image), pixel loading, model-input transforms, target store.

Kedro-free; the ingestion and teacher_targets pipelines call these from thin nodes. Names are imported lazily
(PEP 562), so ``from eva_pipeline.data import SPLITS`` in a pipeline definition does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "IMAGE_EXTENSIONS": "decode",
    "decode_image": "decode",
    "EMBEDDED_DATA_DIR": "idx",
    "parse_idx": "idx",
    "read_idx": "idx",
    "write_idx": "idx",
    "load_images": "images",
    "register_container": "images",
    "split_location": "images",
    "Manifest": "manifest_file",
    "MANIFEST_COLUMNS": "manifest",
    "MANIFEST_DTYPES": "manifest",
    "MANIFEST_SCHEMA": "manifest",
    "PIXEL_DIGEST_COLUMNS": "manifest",
    "REQUIRED_COLUMNS": "manifest",
    "SPLITS": "manifest",
    "SourceScan": "manifest",
    "SourceSpec": "manifest",
    "build_manifest": "manifest",
    "manifest_digest": "manifest",
    "register_source_kind": "manifest",
    "select_split": "manifest",
    "source_kinds": "manifest",
    "validate_manifest": "manifest",
    "write_manifest": "manifest",
    "detect_folder_layout": "sources",
    "TargetStore": "target_store",
    "TargetStoreError": "target_store",
    "compute_targets": "target_store",
    "fingerprint_hash": "target_store",
    "is_complete": "target_store",
    "load_targets": "target_store",
    "TargetReader": "target_store",
    "open_targets": "target_store",
    "items_and_views": "target_store",
    "views_to_crops": "target_store",
    "crops_to_views": "target_store",
    "PixelReader": "images",
    "EpochOrder": "stream",
    "FrameRows": "stream",
    "ParquetRows": "stream",
    "ManifestPixels": "stream",
    "BatchPlan": "stream",
    "batch_loader": "stream",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "to_model_input": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from eva_pipeline.data.decode import IMAGE_EXTENSIONS, decode_image
    from eva_pipeline.data.idx import EMBEDDED_DATA_DIR, parse_idx, read_idx, write_idx
    from eva_pipeline.data.images import load_images, register_container, split_location
    from eva_pipeline.data.manifest import (
        MANIFEST_COLUMNS,
        MANIFEST_DTYPES,
        MANIFEST_SCHEMA,
        PIXEL_DIGEST_COLUMNS,
        REQUIRED_COLUMNS,
        SPLITS,
        SourceScan,
        SourceSpec,
        build_manifest,
        manifest_digest,
        register_source_kind,
        select_split,
        source_kinds,
        validate_manifest,
        write_manifest,
    )
    from eva_pipeline.data.manifest_file import Manifest
    from eva_pipeline.data.sources import detect_folder_layout
    from eva_pipeline.data.images import PixelReader
    from eva_pipeline.data.stream import BatchPlan, EpochOrder, FrameRows, ManifestPixels, ParquetRows, batch_loader
    from eva_pipeline.data.target_store import (
        TargetReader,
        TargetStore,
        TargetStoreError,
        compute_targets,
        crops_to_views,
        fingerprint_hash,
        is_complete,
        items_and_views,
        load_targets,
        open_targets,
        views_to_crops,
    )
    from eva_pipeline.data.transforms import CLIP_MEAN, CLIP_STD, to_model_input
