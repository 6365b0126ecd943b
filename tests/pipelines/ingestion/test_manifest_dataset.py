"""``eva_pipeline.datasets.ManifestDataset`` (the ``manifest`` catalog entry) and the ingestion node's hand-off."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DatasetError

from eva_pipeline.config import IngestionParams
from eva_pipeline.datasets import JsonLinesDataset, ManifestDataset
from eva_pipeline.manifest import Manifest, manifest_digest, select_split
from eva_pipeline.pipelines.common import split_rows
from eva_pipeline.pipelines.ingestion.nodes import build_manifest as build_manifest_node


@pytest.fixture(scope="module")
def node_output(tmp_path_factory, pl):
    """The ingestion node on 40 + 30 + 20 + 10 embedded images (one per source), its scan cache under tmp."""
    root = tmp_path_factory.mktemp("manifest_dataset")
    params = pl.base_params()["ingestion"]
    for source, limit in zip(params["sources"], (40, 30, 20, 10), strict=True):
        source["limit"] = limit
        for key in ("images", "labels"):
            source[key] = str(pl.PROJECT_ROOT / source[key])
    cache = root / "02_intermediate" / "ingestion_cache"
    handle, report, rejections = build_manifest_node(IngestionParams.model_validate(params), cache)
    return root, handle, report, rejections


def test_node_returns_an_owned_handle_and_save_moves_it(node_output):
    root, handle, report, rejections = node_output
    assert isinstance(handle, Manifest) and handle.num_rows == report["totals"]["kept"] == 100
    temp_dir = handle.path.parent
    assert temp_dir.parent == root / "02_intermediate" and temp_dir.name.startswith(".manifest-")
    frame = handle.to_pandas()
    dataset = ManifestDataset(filepath=str(root / "03_primary" / "manifest.parquet"))
    assert not dataset.exists()
    dataset.save(handle)
    assert dataset.exists() and not temp_dir.exists()  # moved, its temporary folder removed
    loaded = dataset.load()
    assert isinstance(loaded, Manifest) and loaded.path == root / "03_primary" / "manifest.parquet"
    pd.testing.assert_frame_equal(loaded.to_pandas(), frame)
    assert rejections.parent == root / "02_intermediate" and rejections.is_file()  # until its dataset moves it
    listing = JsonLinesDataset(filepath=str(root / "08_reporting" / "rejections.jsonl"))
    listing.save(rejections)
    lines, totals = listing.load(), report["totals"]
    assert len(lines) == totals["rejected"] + totals["duplicates"] and "rejections_file" not in report
    assert sorted(p.name for p in (root / "02_intermediate").iterdir()) == ["ingestion_cache"]
    assert any(p.suffix == ".sqlite" for p in (root / "02_intermediate" / "ingestion_cache").iterdir())


def test_save_accepts_a_dataframe_and_a_loaded_manifest(node_output, tmp_path):
    _, handle, _, _ = node_output
    frame = handle.to_pandas()
    a = ManifestDataset(filepath=str(tmp_path / "a.parquet"))
    a.save(frame)
    loaded = a.load()
    pd.testing.assert_frame_equal(loaded.to_pandas(), frame)
    b = ManifestDataset(filepath=str(tmp_path / "b.parquet"))
    b.save(loaded)  # a manifest someone loaded: copied, the original stays
    assert (tmp_path / "a.parquet").exists() and b.load().num_rows == len(frame)
    with pytest.raises(DatasetError, match="saves a Manifest or a pandas DataFrame"):
        b.save({"not": "a manifest"})
    with pytest.raises(DatasetError, match="no manifest at"):
        ManifestDataset(filepath=str(tmp_path / "missing.parquet")).load()


def test_split_rows_accepts_both(node_output, tmp_path):
    _, handle, _, _ = node_output
    frame = handle.to_pandas()
    for split in ("pretrain", "finetune", "probe", "eval"):
        rows = split_rows(handle, split)
        pd.testing.assert_frame_equal(rows, split_rows(frame, split))
        assert rows.index.tolist() == list(range(len(rows)))
        assert handle.digest(split) == manifest_digest(select_split(frame, split)) == manifest_digest(rows)
    only_pretrain = ManifestDataset(filepath=str(tmp_path / "p.parquet"))
    only_pretrain.save(frame[frame["split"] == "pretrain"])
    with pytest.raises(ValueError, match="no 'probe' images"):
        split_rows(only_pretrain.load(), "probe")


def test_catalog_entry_uses_the_dataset(pl):
    entry = pl.read_catalog()["manifest"]
    assert entry == {"type": "eva_pipeline.datasets.ManifestDataset", "filepath": "data/03_primary/manifest.parquet"}
    assert Path(entry["filepath"]).suffix == ".parquet"
