"""What the uniform epoch order costs and what the row index buys back, each against its baseline in the same run.

* ``order``: milliseconds to find the 4,096 sample indices of one step with ``EpochOrder`` (a keyed Feistel
  permutation, O(1) memory, random access), against ``torch.randperm`` of the whole epoch (the official
  ``DistributedSampler``: the same uniform order, held in memory as 8 bytes per image), at 1M and 29.66M images.
* ``rows``: on a synthetic class-sorted manifest (default 1,048,576 rows, of which 100 webdataset shards of 1,486
  members): the row-index build, a lookup of 32 (one rank's share) and 4,096 random rows, against the former
  ``ParquetRows`` (one row-group read per group a uniform batch touches, ~all of them); and one tar member read at
  the offset the index stores, against the former per-shard header scan (LRU of 8 shards: under a uniform order
  every image is in another shard).

Usage::

    .venv/bin/python benchmarks/loader_order.py                  # both, the sizes above (~1 min, ~150 MB in /tmp)
    .venv/bin/python benchmarks/loader_order.py --rows 100000    # smaller manifest
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.pixels import read_tar_span, tar_member_spans
from eva_pipeline.loader.row_index import RowIndex
from eva_pipeline.manifest import ROW_GROUP_ROWS

STEP = 4096  # EVA-01's global batch
RANK_SHARE = 32  # one rank's images per step (128 GPUs)
SHARDS, PER_SHARD = 100, 1_486  # webdataset shards of the synthetic manifest
LRU_SHARDS = 8  # the former PixelReader's per-process shard-index cache
REPEATS = 50


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


def bench_order(sizes: list[int]) -> None:
    print("order: the indices of one step of 4,096")
    for n in sizes:
        order = EpochOrder(n, seed=0)
        order.indices(0, 0, STEP)
        tick = time.perf_counter()
        steps = max(n // STEP, 1)
        for b in range(REPEATS):
            start = (b % steps) * STEP
            order.indices(1, start, min(start + STEP, n))
        feistel = (time.perf_counter() - tick) / REPEATS
        tick = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        randperm = time.perf_counter() - tick
        print(
            f"  {n:>11,} images: EpochOrder {_ms(feistel)} per step, O(1) memory | baseline torch.randperm of the "
            f"epoch {_ms(randperm)} once per epoch, {perm.numel() * perm.element_size() / 2**20:,.0f} MiB held "
            f"| one epoch of steps costs {feistel * (n // STEP) / randperm:.2f}x the randperm"
        )


def _synthetic_manifest(root: Path, rows: int) -> Path:
    """Image-folder rows sorted by class, then tar-shard members (sizes 1-2 kB); every 50th row held out."""
    payload = os.urandom(2048)
    (root / "shards").mkdir()
    members = []
    for s in range(SHARDS):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for k in range(PER_SHARD):
                info = tarfile.TarInfo(f"{s:05d}{k:05d}.jpg")
                info.size = 1000 + (k * 37) % 1000
                tar.addfile(info, io.BytesIO(payload[: info.size]))
                members.append(f"shards/{s:05d}.tar#{info.name}")
    files = max(rows - len(members), 0)
    locations = [f"imagenet21k/n{i // 1000:08d}/n{i // 1000:08d}_{i:07d}.JPEG" for i in range(files)] + members
    n = len(locations)
    table = pa.table(
        {
            "location": locations,
            "width": np.full(n, 500, np.int32),
            "height": np.full(n, 375, np.int32),
            "split": np.where(np.arange(n) % 50 == 0, "probe", "pretrain"),
        }
    )
    path = root / "manifest.parquet"
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
    return path


def bench_rows(rows: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="eva_loader_order_"))
    try:
        manifest = _synthetic_manifest(root, rows)
        rng = np.random.default_rng(0)
        tick = time.perf_counter()
        index = RowIndex.open(manifest, "pretrain", root=root)
        build = time.perf_counter() - tick
        size = sum(p.stat().st_size for p in index.folder.iterdir())
        print(
            f"rows: manifest of {rows:,} rows ({SHARDS * PER_SHARD:,} tar members), "
            f"{pq.ParquetFile(manifest).num_row_groups} row groups"
        )
        print(f"  row index built once per manifest in {build:.2f} s, {size / 2**20:.1f} MiB on disk")

        pf = pq.ParquetFile(manifest)
        tick = time.perf_counter()
        for g in range(min(4, pf.num_row_groups)):
            table = pf.read_row_group(g, columns=["location", "width", "height", "split"]).to_pandas()
            table.loc[table["split"] == "pretrain", ["location", "width", "height"]]
        per_group = (time.perf_counter() - tick) / min(4, pf.num_row_groups)
        for batch in (RANK_SHARE, STEP):
            picks = [rng.integers(0, len(index), size=batch) for _ in range(REPEATS)]
            index.rows(picks[0])
            tick = time.perf_counter()
            for p in picks:
                index.rows(p)
            lookup = (time.perf_counter() - tick) / REPEATS
            groups = int(np.unique(picks[0] // ROW_GROUP_ROWS).size)
            former = groups * per_group
            print(
                f"  {batch:>5} random rows: row index {_ms(lookup)} | baseline former ParquetRows "
                f"{groups} row groups x {_ms(per_group)} = {_ms(former)} | {former / lookup:,.0f}x"
            )

        frame = index.rows(np.arange(len(index)))
        tar_rows = frame[frame["member_offset"] >= 0].sample(200, random_state=0)
        tick = time.perf_counter()
        for location, offset, size in tar_rows[["location", "member_offset", "member_size"]].itertuples(index=False):
            path, member = location.split("#")
            read_tar_span(root / path, member, int(offset), int(size))
        span = (time.perf_counter() - tick) / len(tar_rows)
        lru: OrderedDict[str, dict] = OrderedDict()
        tick = time.perf_counter()
        for location in tar_rows["location"]:
            path, member = location.split("#")
            if path not in lru:
                lru[path] = tar_member_spans(root / path)
                while len(lru) > LRU_SHARDS:
                    lru.popitem(last=False)
            offset, size = lru[path][member]
            with open(root / path, "rb") as fh:
                fh.seek(offset)
                fh.read(size)
        scan = (time.perf_counter() - tick) / len(tar_rows)
        print(
            f"  one tar member in uniform order (page-cached): stored offset {_ms(span)} | baseline per-shard header "
            f"scan, LRU of {LRU_SHARDS} shards, {_ms(scan)} | {scan / span:,.0f}x"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", help="order and/or rows (default: both)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_048_583, 29_663_232])
    parser.add_argument("--rows", type=int, default=1_048_576)
    args = parser.parse_args()
    args.what = args.what or ["order", "rows"]
    if unknown := set(args.what) - {"order", "rows"}:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}: choose order and/or rows")
    if "order" in args.what:
        bench_order(args.sizes)
    if "rows" in args.what:
        bench_rows(args.rows)


if __name__ == "__main__":
    main()
