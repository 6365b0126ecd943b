"""The manifest row index: the manifest's rows in O(1) each, tar members at their stored spans, a cache that is
never stale, safe to build from several processes at once, and built with one row group in memory."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from eva_pipeline.loader import pixels as images_mod
from eva_pipeline.loader import row_index as row_index_mod
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.row_index import INDEX_DIRNAME, RowIndex, manifest_identity
from eva_pipeline.loader.rows import ParquetRows

#: Rows per row group of the test manifests: many groups, splits interleaved across them.
GROUP_ROWS = 7


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, members: dict[str, np.ndarray], reverse: bool = False) -> None:
    """webdataset layout: ``<key>.png`` with a ``<key>.json`` companion; one key's name is too long for a ustar
    header (a pax record carries it)."""
    names = list(members)[::-1] if reverse else list(members)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            _add(tar, name.replace(".png", ".json"), json.dumps({"key": name}).encode())
            _add(tar, name, _png(members[name]))


def _manifest(rows: list[tuple[str, int, int, str]], path: Path) -> Path:
    frame = pd.DataFrame(rows, columns=["location", "width", "height", "split"])
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=GROUP_ROWS)
    return path


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two shards under tmp_path/shards and a manifest mixing their members with files and IDX items, both splits
    interleaved; -> (manifest path, location -> pixels of every tar member)."""
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    pixels: dict[str, np.ndarray] = {}
    rows: list[tuple[str, int, int, str]] = []
    for s in range(2):
        names = [f"{s:05d}{'_a_long_key' * 12 if k == 3 else ''}{k:04d}.png" for k in range(9)]
        members = {n: rng.integers(0, 256, size=(6 + k, 5 + s, 3), dtype=np.uint8) for k, n in enumerate(names)}
        _write_shard(tmp_path / "shards" / f"{s:05d}.tar", members)
        for k, (name, array) in enumerate(members.items()):
            location = f"shards/{s:05d}.tar#{name}"
            pixels[location] = array
            rows.append((location, array.shape[1], array.shape[0], "probe" if k % 4 == 1 else "pretrain"))
            if k % 3 == 0:
                rows.append((f"files/{s}_{k}.jpg", 40 + k, 30 + k, "pretrain"))
                rows.append((f"data.idx.gz#{s * 100 + k}", 28, 28, "probe" if k else "pretrain"))
    return _manifest(rows, tmp_path / "manifest.parquet"), pixels


# ------------------------------------------------------------------------------------------------------- rows
def test_the_index_holds_the_manifest_rows(shards, tmp_path):
    manifest, _pixels = shards
    frame = pd.read_parquet(manifest)
    for split in ("pretrain", "probe"):
        want = frame[frame["split"] == split].reset_index(drop=True)
        index = RowIndex.open(manifest, split, root=tmp_path)
        assert len(index) == len(want)
        rng = np.random.default_rng(1)
        for picks in (rng.integers(0, len(want), size=40), np.arange(len(want))[::-1], np.array([], dtype=int)):
            got = index.rows(picks)
            pd.testing.assert_frame_equal(
                got[["location", "width", "height"]],
                want.iloc[picks][["location", "width", "height"]].reset_index(drop=True),
                check_dtype=False,
            )
            is_tar = got["location"].str.contains(".tar#", regex=False).to_numpy()
            assert (got["member_offset"].to_numpy()[is_tar] > 0).all()
            assert (got[~is_tar][["member_offset", "member_size"]] == -1).all().all()  # files, IDX: no span
        with pytest.raises(IndexError, match="out of range"):
            index.rows(np.array([len(want)]))
    clone = pickle.loads(pickle.dumps(index))  # what a DataLoader worker receives: the folder, maps opened there
    assert clone._maps is None and clone.rows(np.array([0])).equals(index.rows(np.array([0])))


def test_tar_members_are_one_read_at_their_stored_span(shards, tmp_path, monkeypatch):
    manifest, pixels = shards
    rows = ParquetRows(manifest, "pretrain", root=tmp_path)
    frame = rows.rows(np.arange(len(rows)))
    members = frame[frame["member_offset"] >= 0]
    assert len(members) == sum(1 for k in range(9) if k % 4 != 1) * 2
    for location, offset, size in members[["location", "member_offset", "member_size"]].itertuples(index=False):
        shard, member = location.split("#")
        with tarfile.open(tmp_path / shard) as tar:
            want = tar.extractfile(member).read()
        with (tmp_path / shard).open("rb") as fh:
            fh.seek(offset)
            assert fh.read(size) == want
    # Reading never scans a shard's headers: the member index of the fallback path is not even available.
    monkeypatch.setattr(images_mod, "tar_member_spans", _forbidden)
    tar_rows = np.flatnonzero(frame["member_offset"].to_numpy() >= 0)
    got = ManifestPixels(rows, root=tmp_path)(tar_rows[::-1])
    for k, image in zip(tar_rows[::-1], got, strict=True):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels[frame["location"][k]])


def _forbidden(path):
    raise AssertionError(f"scanned the headers of {path}")


def test_a_rewritten_shard_is_read_by_name(shards, tmp_path, caplog):
    manifest, pixels = shards
    rows = ParquetRows(manifest, "pretrain", root=tmp_path)
    shard = tmp_path / "shards" / "00000.tar"
    members = {loc.split("#")[1]: a for loc, a in pixels.items() if loc.startswith("shards/00000.tar#")}
    _write_shard(shard, members, reverse=True)  # same members, other offsets; the manifest is unchanged
    frame = rows.rows(np.arange(len(rows)))
    picks = np.flatnonzero(frame["location"].str.startswith("shards/00000.tar#").to_numpy())
    with caplog.at_level(logging.WARNING, logger="eva_pipeline.loader.pixels"):
        got = ManifestPixels(rows, root=tmp_path)(picks)
    for k, image in zip(picks, got, strict=True):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels[frame["location"][k]])
    assert sum("changed since the manifest row index was built" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------------ cache
def _folders(manifest: Path) -> list[str]:
    return sorted(p.name for p in (manifest.parent / INDEX_DIRNAME).iterdir() if p.is_dir())


def test_a_changed_manifest_is_never_served_stale(tmp_path):
    rows = [(f"img_{i}.png", i, i + 1, "pretrain") for i in range(50)]
    manifest = _manifest(rows, tmp_path / "m.parquet")
    first = RowIndex.open(manifest, "pretrain")
    assert RowIndex.open(manifest, "pretrain").folder == first.folder  # reused, not rebuilt
    stat = manifest.stat()
    _manifest([(f"moved_{i}.png", i, i + 1, "pretrain") for i in range(50)], manifest)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time: the footer differs
    second = RowIndex.open(manifest, "pretrain")
    assert second.folder != first.folder and second.rows(np.array([7]))["location"][0] == "moved_7.png"
    assert _folders(manifest) == [second.folder.name]  # the stale index was removed
    # Another split, another root: indices side by side, each kept.
    RowIndex.open(manifest, "probe")
    RowIndex.open(manifest, "pretrain", root=tmp_path)
    assert len(_folders(manifest)) == 3
    assert manifest_identity(manifest)["mtime_ns"] == stat.st_mtime_ns


def test_a_damaged_index_is_rebuilt(tmp_path):
    manifest = _manifest([(f"img_{i}.png", i, i, "pretrain") for i in range(20)], tmp_path / "m.parquet")
    folder = RowIndex.open(manifest, "pretrain").folder
    (folder / "meta.json").write_text("{")
    assert RowIndex.open(manifest, "pretrain").rows(np.array([3]))["width"][0] == 3


def test_builders_racing_keep_one_complete_index(tmp_path):
    """Without a lock (a file system without flock), two builds of one index: the second finds the first's
    complete folder, keeps it and leaves no temporary folder behind."""
    manifest = _manifest([(f"img_{i}.png", i, i, "pretrain") for i in range(30)], tmp_path / "m.parquet")
    index = RowIndex.open(manifest, "pretrain")
    before = (index.folder / "rows.bin").stat().st_ino
    row_index_mod._build(manifest, "pretrain", tmp_path, index.folder, index.meta | {})
    assert (index.folder / "rows.bin").stat().st_ino == before
    assert [p.name for p in index.folder.parent.iterdir() if p.name.startswith(".building-")] == []


@pytest.mark.slow
def test_concurrent_processes_build_one_index(tmp_path):
    """Ranks opening the index at once (released together after their imports): one folder, the same rows."""
    manifest = _manifest([(f"img_{i}.png", i, i, "pretrain") for i in range(5000)], tmp_path / "m.parquet")
    go, processes = tmp_path / "go", 3
    code = (
        "import os, sys, time, pathlib; from eva_pipeline.loader.row_index import RowIndex\n"
        "pathlib.Path(sys.argv[2] + f'.ready{os.getpid()}').touch()\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
        "i = RowIndex.open(sys.argv[1], 'pretrain'); print(i.folder, len(i), i.rows([4321])['location'][0])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(manifest), str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    (line,) = outputs
    assert line.endswith("5000 img_4321.png") and len(_folders(manifest)) == 1
    assert not [p for p in (manifest.parent / INDEX_DIRNAME).iterdir() if p.name.startswith(".building-")]


# ----------------------------------------------------------------------------------------------------- memory
def _traced_build(tmp_path: Path, n: int, monkeypatch) -> tuple[int, int, list[int]]:
    """(Python peak, Arrow peak above the start, rows per read) of building the index of an n-row manifest."""
    manifest = tmp_path / f"m{n}.parquet"
    locations = pa.array([f"some/folder/n{i % 997:08d}/image_{i:09d}.JPEG" for i in range(n)])
    table = pa.table(
        {
            "location": locations,
            "width": pa.array(np.full(n, 500, np.int32)),
            "height": pa.array(np.full(n, 375, np.int32)),
            "split": pa.array(np.where(np.arange(n) % 10 == 0, "probe", "pretrain")),
        }
    )
    pq.write_table(table, manifest, row_group_size=4096)
    del table, locations
    reads: list[int] = []
    arrow_peak = [0]
    start = pa.total_allocated_bytes()
    original = pq.ParquetFile.read_row_group

    def read_row_group(self, i, *args, **kwargs):
        arrow_peak[0] = max(arrow_peak[0], pa.total_allocated_bytes() - start)  # what earlier groups left behind
        out = original(self, i, *args, **kwargs)
        reads.append(out.num_rows)
        return out

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    tracemalloc.start()
    try:
        index = RowIndex.open(manifest, "pretrain", cache_dir=tmp_path / f"cache{n}")
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(index) == n - len(range(0, n, 10))
    return python_peak, arrow_peak[0], reads


def test_building_holds_one_row_group(tmp_path, monkeypatch):
    """10x the rows, the same memory: row groups are read one at a time and nothing accumulates (measured: Python
    peak 0.35 -> 0.35 MB; Arrow memory held between reads 0.5 -> 0.75 MB, the footer of 10x the groups, while the
    200k locations alone are 9 MB)."""
    RowIndex.open(_manifest([("a.png", 1, 1, "pretrain")], tmp_path / "warm.parquet"), "pretrain")  # one-off caches
    small = _traced_build(tmp_path, 20_000, monkeypatch)
    large = _traced_build(tmp_path, 200_000, monkeypatch)
    assert len(large[2]) == pq.ParquetFile(tmp_path / "m200000.parquet").num_row_groups  # each group read once
    assert max(large[2]) <= 4096
    assert large[0] < 1.5 * small[0], (small, large)
    assert large[1] <= 2 * max(small[1], 2**20), (small, large)


def test_loader_workers_read_through_the_index(shards, tmp_path):
    """The streaming loader over the index and tar shards: the same batches with 0 or 2 workers (each opens the
    maps itself), every image the one its row names."""
    from eva_pipeline.loader.batches import BatchPlan, batch_loader
    from eva_pipeline.loader.order import EpochOrder
    from eva_pipeline.loader.transforms import resize_uint8
    from eva_pipeline.masking import BlockMaskGenerator

    _, pixels = shards
    only_tar = _manifest(
        [(loc, a.shape[1], a.shape[0], "pretrain") for loc, a in pixels.items()], tmp_path / "tar_only.parquet"
    )
    rows = ParquetRows(only_tar, "pretrain", root=tmp_path)
    locations = rows.rows(np.arange(len(rows)))["location"].tolist()
    plan = BatchPlan(
        pixels=ManifestPixels(rows, root=tmp_path),
        order=EpochOrder(len(rows), 1),
        global_batch=4,
        rank=0,
        world_size=1,
        img_size=8,
        seed=1,
        masker=BlockMaskGenerator(grid=(2, 2), num_masking_patches=1, min_num_patches=1),
    )
    inline = list(batch_loader(plan, 0, 6, num_workers=0))
    workers = list(batch_loader(plan, 0, 6, num_workers=2))
    assert [b.step for b in workers] == list(range(6))
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        for i, image in zip(a.indices.tolist(), a.images, strict=True):
            assert torch.equal(image, resize_uint8(torch.from_numpy(pixels[locations[i]]).permute(2, 0, 1), 8))
    seen = np.concatenate([b.indices.numpy() for b in inline[: plan.steps_per_epoch]])
    assert len(np.unique(seen)) == len(seen)
