"""The ingestion report's listing of duplicates: every duplicate with both locations (its own and its kept copy's)
and both labels; a label conflict when they differ, counted per source, listed and logged once."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.scan import SourceSpec


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_posix()


@pytest.fixture
def sources(tmp_path) -> tuple[list[SourceSpec], dict[str, str]]:
    """zoo/ (class folders cat, dog): b is a copy of a in another class (a conflict), c2 a copy of c in the same class;
    farm/ (class folders ant, cat: its "cat" is label 1, zoo's label 0): a copy of zoo's c in "cat" (same class name:
    no conflict) and of zoo's d in "ant" (a conflict); web/ (a shard, unlabelled): a copy of zoo's a (no label: no
    conflict) and one of farm's e."""
    at = {
        "zoo/a": _write(tmp_path / "zoo/cat/a.png", _png(0)),
        "zoo/c": _write(tmp_path / "zoo/cat/c.png", _png(1)),
        "zoo/c2": _write(tmp_path / "zoo/cat/c2.png", _png(1)),
        "zoo/d": _write(tmp_path / "zoo/dog/d.png", _png(2)),
        "zoo/b": _write(tmp_path / "zoo/dog/b.png", _png(0)),
        "farm/d": _write(tmp_path / "farm/ant/d.png", _png(2)),
        "farm/e": _write(tmp_path / "farm/ant/e.png", _png(3)),
        "farm/c": _write(tmp_path / "farm/cat/c.png", _png(1)),
    }
    shard = tmp_path / "web" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for key, data in (("000", _png(0)), ("001", _png(4)), ("002", _png(3))):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    at |= {f"web/{k}": f"{shard.as_posix()}#{k}.png" for k in ("000", "001", "002")}
    specs = [
        SourceSpec("zoo", "image_folder", "finetune", tmp_path / "zoo"),
        SourceSpec("farm", "image_folder", "finetune", tmp_path / "farm"),
        SourceSpec("web", "webdataset", "pretrain", tmp_path / "web"),
    ]
    return specs, at


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_duplicates_are_listed_with_both_locations_and_labels(sources, tmp_path, caplog) -> None:
    specs, at = sources
    with caplog.at_level(logging.WARNING, logger="eva_pipeline.ingest.build"):
        manifest, report = build_manifest(specs, rejections_path=tmp_path / "rejections.jsonl")
    listed = [
        (d["source"], d["location"], d["duplicate_of"], d["duplicate_of_source"], d["label"], d["duplicate_of_label"])
        for d in _lines(tmp_path / "rejections.jsonl")
        if d["reason"] == "duplicate"
    ]
    assert listed == [  # source by source, in scan order; within a source and across sources
        ("zoo", at["zoo/c2"], at["zoo/c"], "zoo", "cat", "cat"),
        ("zoo", at["zoo/b"], at["zoo/a"], "zoo", "dog", "cat"),
        ("farm", at["farm/d"], at["zoo/d"], "zoo", "ant", "dog"),
        ("farm", at["farm/c"], at["zoo/c"], "zoo", "cat", "cat"),  # farm's label 1, zoo's 0: the same class name
        ("web", at["web/000"], at["zoo/a"], "zoo", None, "cat"),
        ("web", at["web/002"], at["farm/e"], "farm", None, "ant"),
    ]
    kept = set(manifest["location"])
    assert {row[2] for row in listed} <= kept and not {row[1] for row in listed} & kept
    # the kept copy's manifest id, to join with the manifest
    by_location = dict(zip(manifest["location"], manifest["id"], strict=True))
    for line in _lines(tmp_path / "rejections.jsonl"):
        assert by_location[line["duplicate_of"]] == line["duplicate_of_id"]

    zoo, farm, web = (report["sources"][name] for name in ("zoo", "farm", "web"))
    assert [(s["duplicates"], s["label_conflicts"]) for s in (zoo, farm, web)] == [(2, 1), (2, 1), (2, 0)]
    assert report["totals"]["label_conflicts"] == 2 and report["totals"]["duplicates"] == 6
    for s in (zoo, farm, web):
        assert s["found"] == s["kept"] + s["rejected"] + s["duplicates"]
    assert [(d["location"], d["label"], d["duplicate_of_label"]) for d in zoo["label_conflict_examples"]] == [
        (at["zoo/b"], "dog", "cat")
    ]
    assert [d["location"] for d in farm["label_conflict_examples"]] == [at["farm/d"]]
    assert [d["location"] for d in zoo["duplicate_examples"]] == [at["zoo/c2"], at["zoo/b"]]
    # the manifest keeps the kept copy's label: zoo/a stays a cat
    assert manifest.loc[manifest["location"] == at["zoo/a"], "label"].item() == 0

    # one warning for the build: the count, per source, and where the conflicts are listed
    assert report["warnings"] == [
        "2 label conflict(s): duplicate images whose kept copy has another class (per source 'zoo': 1, 'farm': 1); "
        "the manifest keeps the kept copy's label. Each is listed with both labels in the rejections list (reason "
        "'duplicate', label_conflict true) and in the report (sources.<name>.label_conflict_examples)"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"ingestion: {report['warnings'][0]}; the rejections list: {tmp_path / 'rejections.jsonl'}"]


def test_the_listing_does_not_depend_on_chunks_nor_is_anything_logged_without_conflicts(
    sources, tmp_path, caplog
) -> None:
    """One-item chunks (every kept copy resolved from another batch): the same rejections file, byte for byte; a
    build whose duplicates all agree on their class logs nothing and reports no warning."""
    specs, _ = sources
    build_manifest(specs, rejections_path=tmp_path / "a.jsonl")
    build_manifest(specs, rejections_path=tmp_path / "b.jsonl", chunk_rows=1)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eva_pipeline.ingest.build"):
        _, report = build_manifest(specs[1:])  # farm and web: web's copy of farm/e has no label, no conflict
    assert report["totals"]["duplicates"] == 1 and report["totals"]["label_conflicts"] == 0
    assert report["warnings"] == [] and not caplog.records
