"""The ingestion pipeline alone (SequentialRunner, tmp catalog): manifest rows and columns, report counts."""

from __future__ import annotations

import json

import pandas as pd

from eva_pipeline.manifest import MANIFEST_COLUMNS, validate_manifest


def test_manifest_has_every_configured_image_in_its_split(workspace, pl):
    workspace.run("ingestion")
    manifest = pd.read_parquet(workspace.path("manifest"))  # what the next stage reads, after the round trip

    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    validate_manifest(manifest)  # dtypes, unique ids, no probe image in pre-training
    assert len(manifest) == pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES
    assert manifest["split"].value_counts().to_dict() == {"pretrain": pl.PRETRAIN_IMAGES, "probe": pl.PROBE_IMAGES}
    probe = manifest[manifest["split"] == "probe"]
    assert probe["label"].notna().all() and set(probe["label"]) <= set(range(10))
    # manifest order is the sample order downstream: source order, then item order
    assert manifest["id"].iloc[0] == "fashion_mnist_train/0"
    assert manifest["id"].iloc[pl.PRETRAIN_IMAGES] == "fashion_mnist_test/0"
    assert (manifest[["width", "height"]] == 28).all().all()


def test_report_counts_found_kept_rejected(workspace, pl):
    workspace.run("ingestion")
    report = json.loads(workspace.path("ingestion_report").read_text())

    train, test = report["sources"]["fashion_mnist_train"], report["sources"]["fashion_mnist_test"]
    assert (train["found"], train["kept"], train["limit"]) == (pl.PRETRAIN_IMAGES,) * 3
    assert (test["found"], test["kept"], test["limit"]) == (pl.PROBE_IMAGES,) * 3
    assert train["available"] == 10_000 and test["available"] == 5_000
    for source in (train, test):
        assert source["found"] == source["kept"] + source["rejected"] + source["duplicates"]
    assert report["totals"]["kept"] == pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES
    assert report["splits"]["pretrain"]["items"] == pl.PRETRAIN_IMAGES
    assert report["splits"]["probe"] == {
        "items": pl.PROBE_IMAGES,
        "labelled": pl.PROBE_IMAGES,
        "sources": ["fashion_mnist_test"],
    }
    assert sum(report["label_histogram"]["probe"].values()) == pl.PROBE_IMAGES


def test_catalog_loads_a_lazy_manifest(workspace, pl):
    from eva_pipeline.manifest import Manifest, manifest_digest, select_split
    from eva_pipeline.pipelines.common import split_rows

    workspace.run("ingestion")
    handle = workspace.catalog.load("manifest")
    assert isinstance(handle, Manifest) and handle.num_rows == pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES
    frame = pd.read_parquet(workspace.path("manifest"))
    for split in ("pretrain", "probe"):
        rows = split_rows(handle, split)  # what the downstream nodes get
        pd.testing.assert_frame_equal(rows, split_rows(frame, split))
        assert handle.digest(split) == manifest_digest(select_split(frame, split))
    # the node's temporary manifest was moved into place: no temporary or work file beside it (the loader's row
    # index cache, built by a later stage of the shared workspace, may be there)
    from eva_pipeline.loader.row_index import INDEX_DIRNAME

    beside = [p.name for p in workspace.path("manifest").parent.iterdir() if p.name != INDEX_DIRNAME]
    assert beside == ["manifest.parquet"]


def test_rejections_and_scan_cache_are_catalog_datasets(workspace):
    """The listing of rejected items and the incremental scan cache are where the catalog says, nowhere else."""
    workspace.run("ingestion")
    report = json.loads(workspace.path("ingestion_report").read_text())
    assert workspace.catalog.load("ingestion_rejections") == []  # the embedded data decodes cleanly
    assert workspace.path("ingestion_rejections").is_file() and "rejections_file" not in report
    cache = workspace.catalog.load("ingestion_scan_cache")
    assert cache == workspace.path("ingestion_scan_cache") and sorted(p.suffix for p in cache.iterdir()) == [
        ".sqlite",
        ".sqlite",
    ]  # one database per source
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary file left beside it


def test_source_table_is_the_composition_with_a_total(workspace, pl):
    workspace.run("ingestion")
    table = pd.read_csv(workspace.path("ingestion_sources"))
    assert list(table["source"]) == ["fashion_mnist_train", "fashion_mnist_test", "total"]
    body, total = table.iloc[:2], table.iloc[2]
    assert list(body["kept"]) == [pl.PRETRAIN_IMAGES, pl.PROBE_IMAGES]
    assert (body["found"] == body["kept"] + body["duplicates"] + body["rejected"]).all()
    for column in ("available", "found", "kept", "duplicates", "rejected"):
        assert total[column] == body[column].sum()
    total_kept = pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES
    assert abs(body["share_of_kept"].iloc[0] - pl.PRETRAIN_IMAGES / total_kept) < 1e-6


def test_source_metrics_are_named_per_source_and_count():
    from eva_pipeline.pipelines.ingestion.nodes import source_metrics, source_table

    report = {
        "sources": {
            "cc 3m/v1!": {
                "kind": "webdataset",
                "split": "pretrain",
                "images": "x",
                "available": 5,
                "found": 5,
                "kept": 3,
                "duplicates": 1,
                "rejected": 1,
            }
        }
    }
    metrics = source_metrics(source_table(report))
    assert metrics["cc 3m/v1_.kept"] == {"value": 3.0, "step": 0}
    assert metrics["total.rejected"] == {"value": 1.0, "step": 0} and len(metrics) == 8
