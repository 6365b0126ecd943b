"""Incremental ingestion: ``build_manifest(..., cache_dir=...)`` re-reads only new or changed units of input."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers import common, webdataset
from eva_pipeline.ingest.readers import idx as idx_reader
from eva_pipeline.ingest.readers.idx import write_idx
from eva_pipeline.ingest.scan import SourceSpec

CACHE_KEYS = ("read", "from_cache", "removed_since_cache", "cache_invalidated")
OLD = time.time_ns() - 600 * 10**9  # well outside the "racy" window


def _png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _age(path: Path, offset_s: int = 0) -> None:
    os.utime(path, ns=(OLD + offset_s * 10**9, OLD + offset_s * 10**9))


def _write(path: Path, data: bytes, offset_s: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    _age(path, offset_s)


def _tar(path: Path, samples: list[tuple[str, bytes, int]], offset_s: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, data, label in samples:
            for name, payload in ((f"{key}.png", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    _age(path, offset_s)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    for c, cls in enumerate(("a", "b")):
        for i in range(2):
            _write(root / "folder" / cls / f"{i}.png", _png(10 * c + i))
    _write(root / "folder" / "b" / "broken.png", b"not a png")  # a rejection, cached too
    _tar(root / "wds" / "00000.tar", [("k0", _png(100), 1), ("k1", _png(101), 2)])
    # k2 has the same bytes as folder/a/0.png: a duplicate across sources
    _tar(root / "wds" / "00001.tar", [("k2", (root / "folder" / "a" / "0.png").read_bytes(), 3), ("k3", _png(103), 4)])
    write_idx(root / "idx" / "images.idx", np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16))
    write_idx(root / "idx" / "labels.idx", np.array([0, 1, 2], dtype=np.uint8))
    for p in (root / "idx").iterdir():
        _age(p)
    return root


def _specs(root: Path, **changes) -> list[SourceSpec]:
    folder = {"name": "folder", "kind": "image_folder", "split": "pretrain", "images": root / "folder"}
    wds = {"name": "wds", "kind": "webdataset", "split": "pretrain", "images": root / "wds"}
    idx = {
        "name": "idx",
        "kind": "idx",
        "split": "probe",
        "images": root / "idx" / "images.idx",
        "labels": root / "idx" / "labels.idx",
    }
    out = []
    for spec in (folder, wds, idx):
        out.append(SourceSpec(**{**spec, **changes.get(spec["name"], {})}))
    return out


@pytest.fixture
def reads(monkeypatch) -> set[str]:
    """Names of the units opened: image files read, shards iterated, IDX files parsed."""
    opened: set[str] = set()
    real_open_file, real_iter, real_idx = common.ingest_file, webdataset.iter_tar_files, idx_reader.read_idx

    def ingest_file(scan, location, label):
        opened.add(Path(location).name)
        return real_open_file(scan, location, label)

    def iter_tar(shard, *args, **kwargs):
        opened.add(Path(shard).name)
        return real_iter(shard, *args, **kwargs)

    def read_idx(path):
        opened.add(Path(path).name)
        return real_idx(path)

    monkeypatch.setattr(common, "ingest_file", ingest_file)
    monkeypatch.setattr(webdataset, "iter_tar_files", iter_tar)
    monkeypatch.setattr(idx_reader, "read_idx", read_idx)
    return opened


def _strip(report: dict) -> dict:
    report = {**report, "sources": {n: dict(s) for n, s in report["sources"].items()}}
    for s in report["sources"].values():
        for key in CACHE_KEYS:
            s.pop(key, None)
    return report


def _check_same_as_fresh(specs, manifest, report) -> None:
    fresh, fresh_report = build_manifest(specs)
    pd.testing.assert_frame_equal(manifest, fresh)
    # PIL names the BytesIO object (its address) in some rejection details: not reproducible even uncached

    def same(report):
        return re.sub(r" at 0x[0-9a-f]+", "", json.dumps(report, sort_keys=True))

    assert same(_strip(report)) == same(fresh_report)


def _counts(report: dict, name: str) -> tuple[int, int, int]:
    s = report["sources"][name]
    return s["read"], s["from_cache"], s["removed_since_cache"]


def test_rebuild_reads_only_new_and_changed_units(tree, tmp_path, reads) -> None:
    cache = tmp_path / "cache"
    specs = _specs(tree)
    manifest, report = build_manifest(specs, cache_dir=cache)
    assert reads == {"0.png", "1.png", "broken.png", "00000.tar", "00001.tar", "images.idx", "labels.idx"}
    assert _counts(report, "folder") == (5, 0, 0)
    assert _counts(report, "wds") == (2, 0, 0)
    assert _counts(report, "idx") == (1, 0, 0)
    assert report["sources"]["wds"]["duplicates"] == 1
    assert len(list(cache.glob("*.sqlite"))) == 3 and not list(cache.glob("*.tmp"))
    _check_same_as_fresh(specs, manifest, report)

    # Nothing changed: nothing is opened.
    reads.clear()
    again, report = build_manifest(specs, cache_dir=cache)
    assert reads == set()
    assert _counts(report, "folder") == (0, 5, 0) and _counts(report, "wds") == (0, 2, 0)
    assert _counts(report, "idx") == (0, 1, 0)
    pd.testing.assert_frame_equal(again, manifest)

    # Add an image and a shard, rewrite one image with other bytes, delete one.
    _write(tree / "folder" / "a" / "2.png", _png(7))
    _write(tree / "folder" / "a" / "1.png", _png(8, size=24), offset_s=5)
    (tree / "folder" / "b" / "0.png").unlink()
    _tar(tree / "wds" / "00002.tar", [("k4", _png(104), 5)])
    reads.clear()
    manifest, report = build_manifest(specs, cache_dir=cache)
    assert reads == {"1.png", "2.png", "00002.tar"}
    assert _counts(report, "folder") == (2, 3, 1)
    assert _counts(report, "wds") == (1, 2, 0)
    assert _counts(report, "idx") == (0, 1, 0)
    reads.clear()
    _check_same_as_fresh(specs, manifest, report)

    # And the cache written by that run is complete.
    reads.clear()
    _, report = build_manifest(specs, cache_dir=cache)
    assert reads == set() and _counts(report, "folder") == (0, 5, 0) and _counts(report, "wds") == (0, 3, 0)


def test_changed_settings_invalidate_only_that_source(tree, tmp_path, reads) -> None:
    cache = tmp_path / "cache"
    build_manifest(_specs(tree), cache_dir=cache)
    for changes, invalidated in (
        ({"folder": {"layout": "flat"}}, "folder"),
        ({"folder": {"layout": "flat"}, "wds": {"split": "probe"}}, "wds"),
    ):
        reads.clear()
        specs = _specs(tree, **changes)
        manifest, report = build_manifest(specs, cache_dir=cache)
        n = {"folder": 5, "wds": 2}[invalidated]
        assert report["sources"][invalidated]["cache_invalidated"] is True
        assert _counts(report, invalidated) == (n, 0, 0)
        for other in {"folder", "wds", "idx"} - {invalidated}:
            assert report["sources"][other]["read"] == 0
        _check_same_as_fresh(specs, manifest, report)


def test_recently_modified_files_are_not_trusted(tree, tmp_path, reads) -> None:
    """A file modified just before the scan is read again next time (its mtime may not change on a rewrite)."""
    cache = tmp_path / "cache"
    fresh = tree / "folder" / "a" / "0.png"
    fresh.write_bytes(fresh.read_bytes())  # mtime: now
    build_manifest(_specs(tree), cache_dir=cache)
    reads.clear()
    _, report = build_manifest(_specs(tree), cache_dir=cache)
    assert reads == {"0.png"}
    assert _counts(report, "folder") == (1, 4, 0)


def test_webdataset_limit_across_changed_shards(tree, tmp_path, reads) -> None:
    """With a limit, a shard read partly is reused only with the same remaining quota."""
    cache = tmp_path / "cache"
    specs = _specs(tree, wds={"limit": 3})
    manifest, report = build_manifest(specs, cache_dir=cache)
    assert report["sources"]["wds"]["available_is_lower_bound"] is True
    _check_same_as_fresh(specs, manifest, report)
    _tar(tree / "wds" / "00000.tar", [("k0", _png(100), 1)], offset_s=5)  # one sample fewer before shard 1
    reads.clear()
    manifest, report = build_manifest(specs, cache_dir=cache)
    assert reads == {"00000.tar", "00001.tar"}
    assert (manifest["source"] == "wds").sum() == 2  # k0 and k3 (k2 is a duplicate of folder/a/0.png)
    _check_same_as_fresh(specs, manifest, report)


def test_small_chunks_and_cache_give_the_same_manifest(tree, tmp_path, reads) -> None:
    """Spilled scans (1-item chunks) replayed from the cache: the manifest of a fresh in-memory-sized build."""
    cache = tmp_path / "cache"
    specs = _specs(tree)
    first, _ = build_manifest(specs, cache_dir=cache, chunk_rows=1, row_group_rows=2)
    reads.clear()
    again, report = build_manifest(specs, cache_dir=cache, chunk_rows=1, row_group_rows=2)
    assert reads == set() and _counts(report, "folder") == (0, 5, 0)
    pd.testing.assert_frame_equal(again, first)
    _check_same_as_fresh(specs, again, report)


def test_failed_scan_keeps_the_previous_cache(tree, tmp_path, reads, monkeypatch) -> None:
    cache = tmp_path / "cache"
    specs = _specs(tree)
    build_manifest(specs, cache_dir=cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    _write(tree / "folder" / "a" / "9.png", _png(9))  # a new file: read, and the reading fails

    def failing(scan, location, label):
        raise OSError("disk on fire")

    monkeypatch.setattr(common, "ingest_file", failing)
    with pytest.raises(OSError, match="disk on fire"):
        build_manifest(specs, cache_dir=cache)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # untouched, no temporary left
    monkeypatch.undo()
    (tree / "folder" / "a" / "9.png").unlink()
    _, report = build_manifest(specs, cache_dir=cache)
    assert _counts(report, "folder") == (0, 5, 0) and _counts(report, "wds") == (0, 2, 0)


def test_unreadable_cache_is_rebuilt(tree, tmp_path, reads) -> None:
    cache = tmp_path / "cache"
    specs = _specs(tree)
    build_manifest(specs, cache_dir=cache)
    (folder_cache,) = [p for p in cache.iterdir() if p.name.startswith("folder-")]
    folder_cache.write_bytes(b"not a database" * 100)
    reads.clear()
    manifest, report = build_manifest(specs, cache_dir=cache)
    assert report["sources"]["folder"]["cache_invalidated"] is True and _counts(report, "folder") == (5, 0, 0)
    assert report["sources"]["wds"]["cache_invalidated"] is False and _counts(report, "wds") == (0, 2, 0)
    _check_same_as_fresh(specs, manifest, report)
