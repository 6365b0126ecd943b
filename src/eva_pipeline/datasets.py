"""Kedro datasets for artefacts with a format of their own."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import torch
from kedro.io import AbstractDataset, DatasetError
from torch import nn

from eva_pipeline.manifest import Manifest, write_frame
from eva_pipeline.models import extract_state_dict, save_official_checkpoint


class EvaCheckpointDataset(AbstractDataset[nn.Module, dict[str, torch.Tensor]]):
    """Student weights in the official EVA-01 format: ``{"model": state_dict}`` in fp16.

    ``save`` takes the module; ``load`` returns the state dict, so any loader of the official
    checkpoints (ours, timm's ``checkpoint_filter_fn``) reads what the pipeline wrote.
    """

    def __init__(self, filepath: str, dtype: str = "float16", metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self._dtype = getattr(torch, dtype)
        self.metadata = metadata

    def load(self) -> dict[str, torch.Tensor]:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(f"no EVA checkpoint at {path}: run the pipeline that produces it (see README)")
        return extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def save(self, data: nn.Module) -> None:
        save_official_checkpoint(data, Path(self._filepath), dtype=self._dtype)

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dtype": str(self._dtype)}


class ManifestDataset(AbstractDataset[Manifest | pd.DataFrame, Manifest]):
    """The image manifest as a Parquet file (:data:`~eva_pipeline.manifest.MANIFEST_SCHEMA`, row groups).

    ``load`` returns a lazy :class:`~eva_pipeline.manifest.Manifest` handle (path, ``num_rows``, ``split(name)``,
    ``iter_batches``, streamed ``digest``), never the whole table. ``save`` takes the handle the ingestion node
    returns (its temporary file is moved into place, or a loaded manifest's file copied) or a DataFrame.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> Manifest:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(
                f"no manifest at {path}: run the ingestion pipeline first (kedro run --pipelines ingestion)"
            )
        return Manifest(path)

    def save(self, data: Manifest | pd.DataFrame) -> None:
        path = Path(self._filepath)
        if isinstance(data, Manifest):
            data.save(path)
        elif isinstance(data, pd.DataFrame):
            write_frame(data, path)
        else:
            raise DatasetError(f"ManifestDataset saves a Manifest or a pandas DataFrame, got {type(data).__name__}")

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
