"""Rows of one split, by index: in memory (small splits, tests) or through the manifest's memory-mapped row index.

A uniform epoch order scatters a batch over the whole manifest, so rows are looked up, not scanned
(:mod:`eva_pipeline.loader.row_index`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from eva_pipeline.loader.row_index import RowIndex

ROW_COLUMNS: tuple[str, ...] = ("location", "width", "height")


class RowSource(Protocol):
    """Random access to the rows of one split: ``rows(indices)`` -> frame with :data:`ROW_COLUMNS` (and, from the
    row index, tar member spans), in order."""

    def __len__(self) -> int: ...

    def rows(self, indices: np.ndarray) -> pd.DataFrame: ...


class FrameRows:
    """Rows held in memory (small splits, tests)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        missing = [c for c in ROW_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"the rows need columns {list(ROW_COLUMNS)}; missing {missing}")
        self.frame = frame.loc[:, list(ROW_COLUMNS)].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        return self.frame.iloc[np.asarray(indices)]


class ParquetRows:
    """The rows of one split of a manifest Parquet file, through its memory-mapped row index.

    The index (:class:`~eva_pipeline.loader.row_index.RowIndex`) is built once per manifest file and split, streamed
    over the row groups, and shared by every rank and worker; a lookup is O(batch) reads of the maps, whatever the
    order. Rows carry the data span of tar-shard members, so :class:`ManifestPixels` reads each with one seek.
    ``root``: the folder relative shard paths resolve against (default: the working directory); ``cache_dir``:
    where the index lives (default: next to the manifest).
    """

    def __init__(
        self,
        path: str | Path,
        split: str,
        root: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.path, self.split = str(path), split
        self.index = RowIndex.open(path, split, root=root, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        try:
            return self.index.rows(indices)
        except IndexError:
            raise IndexError(f"row index out of range for the {len(self)} '{self.split}' rows of {self.path}") from None
