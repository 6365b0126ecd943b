"""The ingestion pipeline alone (SequentialRunner, tmp catalog): manifest rows and columns, report counts."""

from __future__ import annotations

import json

import pandas as pd

from eva_pipeline.manifest import MANIFEST_COLUMNS, validate_manifest

#: The first 60 Animal-MNIST images hold one exact copy (de-duplication keeps 59).
FINETUNE_KEPT = 59
SOURCES = ("fashion_mnist_train", "fashion_mnist_test", "animal_mnist", "fashion_mnist_fresh")


def _total(pl) -> int:
    return pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES + FINETUNE_KEPT + pl.EVAL_IMAGES


def test_manifest_has_every_configured_image_in_its_split(workspace, pl):
    workspace.run("ingestion")
    manifest = pd.read_parquet(workspace.path("manifest"))  # what the next stage reads, after the round trip

    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    validate_manifest(manifest)  # dtypes, unique ids, no held-out image in a training split
    assert len(manifest) == _total(pl)
    assert manifest["split"].value_counts().to_dict() == {
        "pretrain": pl.PRETRAIN_IMAGES,
        "probe": pl.PROBE_IMAGES,
        "finetune": FINETUNE_KEPT,
        "eval": pl.EVAL_IMAGES,
    }
    probe = manifest[manifest["split"] == "probe"]
    assert probe["label"].notna().all() and set(probe["label"]) <= set(range(10))
    # manifest order is the sample order downstream: source order, then item order
    assert manifest["id"].iloc[0] == "fashion_mnist_train/0"
    assert manifest["id"].iloc[pl.PRETRAIN_IMAGES] == "fashion_mnist_test/0"
    assert manifest["id"].iloc[pl.PRETRAIN_IMAGES + pl.PROBE_IMAGES] == "animal_mnist/0"
    assert manifest["id"].iloc[-1] == f"fashion_mnist_fresh/{pl.EVAL_IMAGES - 1}"
    assert (manifest[["width", "height"]] == 28).all().all()


def test_class_names_name_every_labelled_source_in_label_order(workspace, pl):
    """The class_names output: what fine-tuning combines sources by (Fashion-MNIST's 0 and Animal-MNIST's 0 differ)."""
    workspace.run("ingestion")
    names = json.loads(workspace.path("class_names").read_text())
    assert names == workspace.catalog.load("class_names")
    fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    animals = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    assert list(names) == list(SOURCES)
    assert names == {
        "fashion_mnist_train": fashion,
        "fashion_mnist_test": fashion,
        "animal_mnist": animals,
        "fashion_mnist_fresh": fashion,
    }


def test_class_names_node_skips_unlabelled_sources():
    from eva_pipeline.pipelines.ingestion.nodes import class_names

    report = {"sources": {"web": {"classes": None}, "in21k": {"classes": ["n01", "n02"]}, "old": {}}}
    assert class_names(report) == {"in21k": ["n01", "n02"]}


def test_report_counts_found_kept_rejected(workspace, pl):
    workspace.run("ingestion")
    report = json.loads(workspace.path("ingestion_report").read_text())

    train, test = report["sources"]["fashion_mnist_train"], report["sources"]["fashion_mnist_test"]
    animals, fresh = report["sources"]["animal_mnist"], report["sources"]["fashion_mnist_fresh"]
    assert (train["found"], train["kept"], train["limit"]) == (pl.PRETRAIN_IMAGES,) * 3
    assert (test["found"], test["kept"], test["limit"]) == (pl.PROBE_IMAGES,) * 3
    assert (animals["found"], animals["kept"], animals["duplicates"]) == (pl.FINETUNE_IMAGES, FINETUNE_KEPT, 1)
    assert (fresh["found"], fresh["kept"], fresh["limit"]) == (pl.EVAL_IMAGES,) * 3
    assert [s["available"] for s in (train, test, animals, fresh)] == [10_000, 5_000, 10_000, 2_000]
    for source in (train, test, animals, fresh):
        assert source["found"] == source["kept"] + source["rejected"] + source["duplicates"]
    assert report["totals"]["kept"] == _total(pl)
    assert report["splits"]["pretrain"]["items"] == pl.PRETRAIN_IMAGES
    assert report["splits"]["probe"] == {
        "items": pl.PROBE_IMAGES,
        "labelled": pl.PROBE_IMAGES,
        "sources": ["fashion_mnist_test"],
    }
    assert report["splits"]["finetune"] == {
        "items": FINETUNE_KEPT,
        "labelled": FINETUNE_KEPT,
        "sources": ["animal_mnist"],
    }
    assert report["splits"]["eval"]["sources"] == ["fashion_mnist_fresh"]
    assert sum(report["label_histogram"]["probe"].values()) == pl.PROBE_IMAGES


def test_catalog_loads_a_lazy_manifest(workspace, pl):
    from eva_pipeline.manifest import Manifest, manifest_digest, select_split
    from eva_pipeline.pipelines.common import split_rows

    workspace.run("ingestion")
    handle = workspace.catalog.load("manifest")
    assert isinstance(handle, Manifest) and handle.num_rows == _total(pl)
    frame = pd.read_parquet(workspace.path("manifest"))
    for split in ("pretrain", "finetune", "probe", "eval"):
        rows = split_rows(handle, split)  # what the downstream nodes get
        pd.testing.assert_frame_equal(rows, split_rows(frame, split))
        assert handle.digest(split) == manifest_digest(select_split(frame, split))
    # the node's temporary manifest was moved into place: no temporary or work file beside it (the loader's row
    # index cache, built by a later stage of the shared workspace, may be there)
    from eva_pipeline.loader.row_index import INDEX_DIRNAME

    beside = sorted(p.name for p in workspace.path("manifest").parent.iterdir() if p.name != INDEX_DIRNAME)
    assert beside == ["class_names.json", "manifest.parquet"]  # class_names: a catalog output of its own


def test_rejections_and_scan_cache_are_catalog_datasets(workspace):
    """The listing of rejected items and the incremental scan cache are where the catalog says, nowhere else."""
    workspace.run("ingestion")
    report = json.loads(workspace.path("ingestion_report").read_text())
    # the embedded data decodes cleanly: what is not kept is Animal-MNIST's one copy, listed with its kept copy
    listing = workspace.catalog.load("ingestion_rejections")
    assert [(r["source"], r["reason"], r["duplicate_of_source"]) for r in listing] == [
        ("animal_mnist", "duplicate", "animal_mnist")
    ]
    assert listing[0]["label"] == listing[0]["duplicate_of_label"] and not listing[0]["label_conflict"]
    assert report["sources"]["animal_mnist"]["duplicate_examples"] == [
        {k: v for k, v in listing[0].items() if k not in ("source", "reason", "detail")}
    ]
    assert workspace.path("ingestion_rejections").is_file() and "rejections_file" not in report
    cache = workspace.catalog.load("ingestion_scan_cache")
    databases = sorted(p.suffix for p in cache.iterdir())
    assert cache == workspace.path("ingestion_scan_cache") and databases == [".sqlite"] * 4  # one per source
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary file left beside it


def test_source_table_is_the_composition_with_a_total(workspace, pl):
    workspace.run("ingestion")
    table = pd.read_csv(workspace.path("ingestion_sources"))
    assert list(table["source"]) == [*SOURCES, "total"]
    body, total = table.iloc[:4], table.iloc[4]
    assert list(body["kept"]) == [pl.PRETRAIN_IMAGES, pl.PROBE_IMAGES, FINETUNE_KEPT, pl.EVAL_IMAGES]
    assert list(body["split"]) == ["pretrain", "probe", "finetune", "eval"]
    assert (body["found"] == body["kept"] + body["duplicates"] + body["rejected"]).all()
    for column in ("available", "found", "kept", "duplicates", "rejected"):
        assert total[column] == body[column].sum()
    assert abs(body["share_of_kept"].iloc[0] - pl.PRETRAIN_IMAGES / _total(pl)) < 1e-6


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
    assert metrics["cc 3m_v1_/kept"] == {"value": 3.0, "step": 0}  # "/" only between the parts of a name
    assert metrics["total/rejected"] == {"value": 1.0, "step": 0} and len(metrics) == 8
