"""Manifest building over the embedded sources, de-duplication, the source registry and validation errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eva_pipeline.ingest import scan as scan_mod
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers.idx import read_idx, write_idx
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, register_source_kind
from eva_pipeline.manifest import (
    HELD_OUT_SPLITS,
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    SPLITS,
    manifest_digest,
    select_split,
    validate_manifest,
)


def test_embedded_manifest_rows_schema_and_labels(embedded, fmnist) -> None:
    manifest, _ = embedded
    assert len(manifest) == 15000
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    validate_manifest(manifest)
    assert manifest["id"].is_unique and manifest["location"].is_unique
    assert (manifest["split"] == "pretrain").sum() == 10000 and (manifest["split"] == "probe").sum() == 5000
    assert (manifest["width"] == 28).all() and (manifest["height"] == 28).all()
    assert (manifest["size_bytes"] == 784).all()
    assert sorted(manifest["label"].unique().tolist()) == list(range(10))
    # Labels are the IDX labels in file order; ids and locations carry the item index.
    train = select_split(manifest, "pretrain")
    assert np.array_equal(train["label"].to_numpy(dtype=np.int64), read_idx(fmnist.train_labels))
    assert train["id"].iloc[1234] == "fmnist_train/1234"
    assert train["location"].iloc[1234].endswith("train-images-idx3-ubyte.gz#1234")
    probe = select_split(manifest, "probe")
    assert np.array_equal(probe["label"].to_numpy(dtype=np.int64), read_idx(fmnist.test_labels))
    assert probe.index.tolist() == list(range(5000))


def test_pretrain_and_probe_are_disjoint(embedded) -> None:
    manifest, _ = embedded
    pre, probe = select_split(manifest, "pretrain"), select_split(manifest, "probe")
    for col in ("id", "location", "content_hash"):
        assert not set(pre[col]) & set(probe[col]), col
    assert set(pre["source"]) == {"fmnist_train"} and set(probe["source"]) == {"fmnist_test"}


def test_parquet_round_trip_keeps_schema(embedded, tmp_path) -> None:
    manifest, _ = embedded
    table = pa.Table.from_pandas(manifest, schema=MANIFEST_SCHEMA, preserve_index=False)
    pq.write_table(table, tmp_path / "manifest.parquet")
    assert pq.read_schema(tmp_path / "manifest.parquet").remove_metadata().equals(MANIFEST_SCHEMA)
    back = pd.read_parquet(tmp_path / "manifest.parquet")
    validate_manifest(back)
    assert back["label"].tolist() == manifest["label"].tolist() and manifest_digest(back) == manifest_digest(manifest)
    # pandas' own writer (what a Kedro ParquetDataset uses) keeps the dtypes too.
    manifest.to_parquet(tmp_path / "m2.parquet", index=False)
    validate_manifest(pd.read_parquet(tmp_path / "m2.parquet"))


def test_report_counts_are_consistent(embedded) -> None:
    manifest, report = embedded
    json.dumps(report)  # JSON-ready
    for name, expected in (("fmnist_train", 10000), ("fmnist_test", 5000)):
        src = report["sources"][name]
        assert src["found"] == src["available"] == src["kept"] == expected
        assert src["found"] == src["kept"] + src["rejected"] + src["duplicates"]
    assert report["totals"] == {"found": 15000, "kept": 15000, "rejected": 0, "duplicates": 0, "label_conflicts": 0}
    assert report["warnings"] == []
    assert report["splits"]["pretrain"]["items"] == 10000 and report["splits"]["probe"]["labelled"] == 5000
    for split in ("pretrain", "probe"):
        rows = manifest[manifest["split"] == split]
        expected = np.bincount(rows["label"].to_numpy(dtype=np.int64), minlength=10)
        hist = report["label_histogram"][split]
        assert [hist[str(k)] for k in range(10)] == expected.tolist()
        assert sum(hist.values()) == report["splits"][split]["items"]
    assert report["label_histogram"]["pretrain"]["0"] == 942  # class 0 count of the first 10k training images


def test_limit_is_respected(fmnist) -> None:
    manifest, report = build_manifest(fmnist.specs(train_limit=100, test_limit=7))
    assert len(manifest) == 107
    assert select_split(manifest, "pretrain")["id"].tolist() == [f"fmnist_train/{i}" for i in range(100)]
    test = report["sources"]["fmnist_test"]
    assert (test["available"], test["found"], test["kept"], test["limit"]) == (5000, 7, 7, 7)
    assert report["totals"]["found"] == 107


def _tiny_sources(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    a[2] = a[0]  # duplicate within the source
    a[4] = a[0]  # and again
    b = rng.integers(0, 256, size=(2, 4, 4), dtype=np.uint8)
    b[1] = a[3]  # the probe source holds a copy of a pre-training image
    write_idx(tmp_path / "a.idx.gz", a)
    write_idx(tmp_path / "a-labels.idx", np.arange(5, dtype=np.uint8))
    write_idx(tmp_path / "b.idx", b)
    return [
        SourceSpec("a", "idx", "pretrain", tmp_path / "a.idx.gz", tmp_path / "a-labels.idx"),
        SourceSpec("b", "idx", "probe", tmp_path / "b.idx"),
    ]


def test_dedup_counts_and_keeps_probe_copy(tmp_path) -> None:
    manifest, report = build_manifest(_tiny_sources(tmp_path))
    # a/2 and a/4 duplicate a/0; a/3 is also probe image b/1, so the probe keeps it and pre-training drops it.
    assert manifest["id"].tolist() == ["a/0", "a/1", "b/0", "b/1"]
    a, b = report["sources"]["a"], report["sources"]["b"]
    assert (a["found"], a["kept"], a["duplicates"], a["rejected"]) == (5, 2, 3, 0)
    assert (b["found"], b["kept"], b["duplicates"]) == (2, 2, 0)
    at = {name: (tmp_path / name).as_posix() for name in ("a.idx.gz", "b.idx")}
    # each duplicate by its location and its kept copy's (the manifest id of the kept copy too), with both labels
    assert [
        (d["location"], d["duplicate_of"], d["duplicate_of_id"], d["label"], d["duplicate_of_label"])
        for d in a["duplicate_examples"]
    ] == [
        (f"{at['a.idx.gz']}#2", f"{at['a.idx.gz']}#0", "a/0", "2", "0"),
        (f"{at['a.idx.gz']}#3", f"{at['b.idx']}#1", "b/1", "3", None),  # the probe copy has no label: no conflict
        (f"{at['a.idx.gz']}#4", f"{at['a.idx.gz']}#0", "a/0", "4", "0"),
    ]
    assert set(manifest["location"]) >= {d["duplicate_of"] for d in a["duplicate_examples"]}
    assert set(manifest["id"]) >= {d["duplicate_of_id"] for d in a["duplicate_examples"]}
    # a/2 and a/4 are copies of a/0 with other labels: label conflicts, counted and listed
    assert [d["label_conflict"] for d in a["duplicate_examples"]] == [True, False, True]
    assert a["label_conflicts"] == 2 and a["label_conflict_examples"] == [a["duplicate_examples"][i] for i in (0, 2)]
    assert b["label_conflicts"] == 0 and b["duplicate_examples"] == b["label_conflict_examples"] == []
    assert report["totals"] == {"found": 7, "kept": 4, "rejected": 0, "duplicates": 3, "label_conflicts": 2}
    assert report["totals"]["found"] == sum(report["totals"][k] for k in ("kept", "rejected", "duplicates"))
    assert manifest["label"].tolist()[:2] == [0, 1] and manifest["label"].isna().tolist()[2:] == [True, True]
    assert report["splits"]["probe"] == {"items": 2, "labelled": 0, "sources": ["b"]}
    assert manifest["size_bytes"].tolist() == [16] * 4


def test_without_dedup_a_probe_leak_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"1 pretrain image\(s\) are also held-out images \(probe or eval"):
        build_manifest(_tiny_sources(tmp_path), dedup=False)
    manifest, report = build_manifest(_tiny_sources(tmp_path)[:1], dedup=False)
    assert len(manifest) == 5 and report["totals"]["duplicates"] == 0


def test_splits_and_which_are_held_out() -> None:
    assert SPLITS == ("pretrain", "finetune", "probe", "eval") and HELD_OUT_SPLITS == ("probe", "eval")


def test_an_eval_source_claims_its_images_before_training_sources(tmp_path) -> None:
    """Held-out sources claim first whatever their place in the list; probe and eval are both held out."""
    rng = np.random.default_rng(3)
    pre, tune, fresh = (rng.integers(0, 256, size=(4, 4, 4), dtype=np.uint8) for _ in range(3))
    tune[0] = pre[1]  # shared by two training splits: the first listed keeps it
    fresh[2] = pre[3]  # held out: the pre-training copy goes
    fresh[3] = tune[2]  # held out: the fine-tuning copy goes
    for name, array in (("pre", pre), ("tune", tune), ("fresh", fresh)):
        write_idx(tmp_path / f"{name}.idx", array)
    write_idx(tmp_path / "tune-labels.idx", np.array([0, 1, 2, 1], dtype=np.uint8))
    specs = [
        SourceSpec("pre", "idx", "pretrain", tmp_path / "pre.idx"),
        SourceSpec("tune", "idx", "finetune", tmp_path / "tune.idx", tmp_path / "tune-labels.idx"),
        SourceSpec("fresh", "idx", "eval", tmp_path / "fresh.idx"),
    ]
    manifest, report = build_manifest(specs)
    assert manifest["id"].tolist() == ["pre/0", "pre/1", "pre/2", "tune/1", "tune/3", *(f"fresh/{i}" for i in range(4))]
    assert select_split(manifest, "finetune")["label"].tolist() == [1, 1]
    duplicates = {
        name: [
            (Path(d["location"]).name, Path(d["duplicate_of"]).name, d["duplicate_of_id"])
            for d in report["sources"][name]["duplicate_examples"]
        ]
        for name in ("pre", "tune", "fresh")
    }
    assert duplicates == {
        "pre": [("pre.idx#3", "fresh.idx#2", "fresh/2")],
        "tune": [("tune.idx#0", "pre.idx#1", "pre/1"), ("tune.idx#2", "fresh.idx#3", "fresh/3")],
        "fresh": [],
    }
    assert report["splits"]["eval"] == {"items": 4, "labelled": 0, "sources": ["fresh"]}
    assert report["label_histogram"]["finetune"] == {"1": 2} and report["label_histogram"]["eval"] == {}
    validate_manifest(manifest)
    with pytest.raises(ValueError, match=r"1 pretrain and 1 finetune image\(s\) are also held-out images"):
        build_manifest(specs, dedup=False)


def test_idx_class_names_given_default_and_refused(tmp_path) -> None:
    specs = _tiny_sources(tmp_path)  # a: labels 0..4; b: no labels file
    _, report = build_manifest(specs)
    assert report["sources"]["a"]["classes"] == ["0", "1", "2", "3", "4"] and report["sources"]["b"]["classes"] is None
    named = replace(specs[0], classes=["ant", "bee", "cat", "dog", "eel", "fox"])  # more names than labels used: kept
    _, report = build_manifest([named, specs[1]])
    assert report["sources"]["a"]["classes"] == ["ant", "bee", "cat", "dog", "eel", "fox"]
    with pytest.raises(ValueError, match=r"source 'a': 1 item\(s\) have a label outside its 4 class names \(labels"):
        build_manifest([replace(specs[0], classes=["ant", "bee", "cat", "dog"])])  # a/4 has label 4
    with pytest.raises(ValueError, match=r"source 'a': class names must be unique, repeated: \['bee'\]"):
        replace(specs[0], classes=["ant", "bee", "bee", "dog", "eel"])
    with pytest.raises(ValueError, match="the idx source has no labels file"):
        replace(specs[1], classes=["x"])
    for bad in ([], ["a", " "], "abc"):
        with pytest.raises(ValueError, match="'classes' must be"):
            replace(specs[0], classes=bad)
    assert replace(specs[0], classes=["ant", "bee"]).classes == ("ant", "bee")  # a tuple: the spec stays hashable


def test_missing_source_fails_before_any_reading(tmp_path, fmnist, monkeypatch) -> None:
    calls = []
    monkeypatch.setitem(scan_mod._SOURCE_READERS, "idx", lambda spec: calls.append(spec) or None)
    specs = [*fmnist.specs(), SourceSpec("gone", "idx", "pretrain", tmp_path / "gone.gz", tmp_path / "gone-labels")]
    with pytest.raises(FileNotFoundError, match=r"'gone'.*gone\.gz, .*gone-labels.*data/01_raw/fashion_mnist"):
        build_manifest(specs)
    assert calls == []


def test_corrupt_sources_name_the_source(tmp_path, fmnist) -> None:
    write_idx(tmp_path / "labels.idx", np.zeros(3, dtype=np.uint8))
    spec = SourceSpec("short", "idx", "pretrain", fmnist.test_images, tmp_path / "labels.idx")
    with pytest.raises(ValueError, match=r"source 'short' \(idx\): .*3 labels for 5000 images"):
        build_manifest([spec])
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ValueError, match=r"source 'junk'.*junk\.gz: corrupt or truncated gzip"):
        build_manifest([SourceSpec("junk", "idx", "pretrain", tmp_path / "junk.gz")])
    write_idx(tmp_path / "float.idx", np.zeros((2, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected uint8"):
        build_manifest([SourceSpec("f", "idx", "pretrain", tmp_path / "float.idx")])


def test_spec_and_build_argument_errors(fmnist) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        SourceSpec("x", "idx", "train", fmnist.train_images)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        SourceSpec("x", "idx", "pretrain", fmnist.train_images, limit=0)
    with pytest.raises(ValueError, match="source name"):
        SourceSpec("a#b", "idx", "pretrain", fmnist.train_images)
    with pytest.raises(ValueError, match=r"unknown source kind\(s\) \['tar'\]"):
        build_manifest([SourceSpec("x", "tar", "pretrain", fmnist.train_images)])
    with pytest.raises(ValueError, match=r"repeated: \['x'\]"):
        build_manifest([SourceSpec("x", "idx", "pretrain", fmnist.train_images)] * 2)
    with pytest.raises(ValueError, match="unknown keys"):
        SourceSpec.from_mapping({"name": "x", "kind": "idx", "split": "probe", "images": "a", "path": "b"})
    spec = SourceSpec.from_mapping({"name": "x", "kind": "idx", "split": "probe", "images": "a", "limit": 3})
    assert spec.limit == 3 and spec.labels is None


def test_new_source_kind_plugs_in_with_rejections(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(scan_mod, "_SOURCE_READERS", dict(scan_mod._SOURCE_READERS))
    (tmp_path / "list.txt").write_text("ok1.png\nbroken.png\nok2.png\n")

    @register_source_kind("toy_list")
    def read_list(spec: SourceSpec) -> SourceScan:
        scan = SourceScan(available=3)
        for i, name in enumerate((tmp_path / "list.txt").read_text().split()):
            if name.startswith("broken"):
                scan.rejections.append({"location": name, "reason": "cannot decode"})
                continue
            scan.locations.append(name)
            scan.labels.append(i)
            scan.widths.append(10)
            scan.heights.append(8)
            scan.size_bytes.append(123)
            scan.hashes.append(f"h{i}")
        return scan

    manifest, report = build_manifest([SourceSpec("files", "toy_list", "pretrain", tmp_path / "list.txt")])
    assert manifest["location"].tolist() == ["ok1.png", "ok2.png"] and manifest["id"].tolist() == ["files/0", "files/1"]
    src = report["sources"]["files"]
    assert (src["found"], src["kept"], src["rejected"]) == (3, 2, 1)
    assert src["rejected_examples"] == [{"location": "broken.png", "reason": "cannot decode"}]
    assert "toy_list" in scan_mod.source_kinds() and src["classes"] == ["0", "1", "2"]

    @register_source_kind("toy_named")
    def read_named(spec: SourceSpec) -> SourceScan:
        scan = read_list(spec)
        scan.info["classes"] = ["x", "y", "z"]  # a reader that knows its class names, as an image folder does
        return scan

    _, report = build_manifest([SourceSpec("named", "toy_named", "pretrain", tmp_path / "list.txt")])
    assert report["sources"]["named"]["classes"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"source 'named': its reader names the classes itself \(3\)"):
        build_manifest([SourceSpec("named", "toy_named", "pretrain", tmp_path / "list.txt", classes=["x", "y", "z"])])


def test_validate_manifest_reports_every_problem(embedded) -> None:
    good = embedded[0].head(6).copy()
    bad = good.copy()
    bad.loc[1, "id"] = bad.loc[0, "id"]
    bad.loc[2, "split"] = "train"
    bad["width"] = bad["width"].astype("int64")
    bad.loc[3, "source"] = ""
    with pytest.raises(ValueError) as info:
        validate_manifest(bad)
    message = str(info.value)
    assert "1 duplicate id(s)" in message and "unknown split value(s) ['train']" in message
    assert "'width' must be int32" in message and "'source' has missing or empty values" in message
    with pytest.raises(ValueError, match=r"missing columns \['split'\]"):
        validate_manifest(good.drop(columns="split"))
    with pytest.raises(ValueError, match="'label' must be Int64"):
        validate_manifest(good.assign(label=good["label"].astype("float64")))
    leak = good.copy()
    leak.loc[5, "split"] = "probe"
    leak.loc[5, "content_hash"] = leak.loc[0, "content_hash"]
    with pytest.raises(ValueError, match=r"1 pretrain image\(s\) are also held-out images"):
        validate_manifest(leak)
    leak.loc[5, "split"] = "eval"  # as held out as probe
    leak.loc[4, "split"] = "finetune"
    leak.loc[4, "content_hash"] = leak.loc[5, "content_hash"]
    with pytest.raises(ValueError, match=r"1 pretrain and 1 finetune image\(s\) are also held-out images"):
        validate_manifest(leak)
    leak.loc[[0, 4], "split"] = "probe"  # held out twice: no training image has its content
    validate_manifest(leak)
    assert validate_manifest(good.drop(columns="content_hash")) is not None  # the hash column is optional


def test_manifest_digest_tracks_pixels_not_labels(embedded) -> None:
    manifest = embedded[0].head(100).copy()
    digest = manifest_digest(manifest)
    assert digest == manifest_digest(manifest.copy()) and len(digest) == 64
    assert manifest_digest(manifest.assign(label=manifest["label"] + 1)) == digest
    assert manifest_digest(manifest.iloc[::-1]) != digest  # row order matters: target row i <-> manifest row i
    moved = manifest.copy()
    moved.loc[0, "location"] = "elsewhere#0"
    assert manifest_digest(moved) != digest
    assert manifest_digest(manifest, columns=("id", "label")) != manifest_digest(manifest, columns=("id",))
