"""Target store with K augmented views per image: stored targets equal the online teacher's for the stored crops,
resume, ranks computing concurrently (also over a stale store), the lazy reader, and clear errors (issue #5)."""

from __future__ import annotations

import json
import os
import pickle
import runpy
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.augment import RandomResizedCropFlip, crops_to_views, view_rng, views_to_crops
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.targets.layout import STORE_FORMAT, TargetStoreError, items_and_views
from eva_pipeline.targets.reader import TargetReader
from eva_pipeline.targets.store import TargetStore

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
NUM_ITEMS, K, SIZE, SEED = 8, 3, 28, 7  # 24 rows
SHARD, BATCH = 5, 3  # 5 shards (the last holds 4 rows), 2 teacher calls per shard
GRID = (7, 7)
FINGERPRINT = {
    "manifest": "fmnist-8",
    "teacher": "efficientnet_lite0/10",
    "img_size": SIZE,
    "grid": list(GRID),
    "views": {"seed": SEED, "scale": [0.2, 1.0]},
}
AUG = RandomResizedCropFlip(SIZE)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 real Fashion-MNIST images, uint8 (8, 1, 28, 28)."""
    return torch.from_numpy(np.array(read_idx(RAW)[:NUM_ITEMS]))[:, None]


def _view(item: int, view: int):
    return AUG.sample(SIZE, SIZE, view_rng(SEED, view, item))


class ViewBatches:
    """batch_fn for K views per image: crops each row's view, returns (model input, int32 crops)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.ranges: list[tuple[int, int]] = []

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.ranges.append((start, stop))
        items, views = items_and_views(start, stop, K)
        crops = [_view(int(i), int(v)) for i, v in zip(items, views, strict=True)]
        pixels = torch.stack([AUG.apply(self.images[int(i)], c) for i, c in zip(items, crops, strict=True)])
        return to_model_input(pixels, SIZE), views_to_crops(crops)


class PatchTeacher:
    """Exact, cheap stand-in teacher: 4x4 patches scaled by 0.5 (copies only: bit-identical in any process)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_after = fail_after

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(x.shape[0])
        return F.unfold(x, kernel_size=4, stride=4).transpose(1, 2) * 0.5  # (n, 49, 48)


def _compute(root, images, teacher=None, **kwargs):
    teacher = teacher or PatchTeacher()
    batches = ViewBatches(images)
    kwargs = {"shard_size": SHARD, "batch_size": BATCH, "progress": False, "views_per_item": K, **kwargs}
    TargetStore(root).compute(FINGERPRINT, NUM_ITEMS, batches, teacher, **kwargs)
    return teacher, batches


# -- (a) stored targets == the online teacher's for the stored crops ---------------------------------------------
def test_stored_targets_equal_online_teacher_for_the_stored_crops(tmp_path, images) -> None:
    from eva_pipeline.teachers import create_teacher

    teacher = create_teacher("efficientnet_lite0", block_index=10, device="cpu")
    _compute(tmp_path, images, teacher=lambda x: teacher.targets(x, GRID))
    reader = TargetStore(tmp_path).reader(FINGERPRINT)
    assert (reader.num_items, reader.views_per_item, reader.num_rows) == (NUM_ITEMS, K, NUM_ITEMS * K)
    assert reader.shape == (49, teacher.target_dim) and reader.has_crops

    rng = np.random.default_rng(0)  # read in a shuffled order, as training does
    items, views = rng.permutation(NUM_ITEMS).repeat(K), np.tile(np.arange(K), NUM_ITEMS)
    targets, crops = reader.get(items, views)
    assert targets.dtype == torch.float16 and targets.shape == (NUM_ITEMS * K, 49, 112)
    assert crops.dtype == torch.int32 and crops.shape == (NUM_ITEMS * K, 5)
    stored_views = crops_to_views(crops)
    assert stored_views == [
        _view(int(i), int(v)) for i, v in zip(items, views, strict=True)
    ]  # exactly the sampled views
    assert len(set(stored_views)) == len(stored_views)  # the views really differ

    # Online: re-apply the *stored* crop to the image, one batch of all rows (other batching than the store's).
    pixels = torch.stack([AUG.apply(images[int(i)], v) for i, v in zip(items, stored_views, strict=True)])
    online = teacher.targets(to_model_input(pixels, SIZE), GRID)
    torch.testing.assert_close(targets.float(), online, rtol=1e-3, atol=1e-3)
    assert (targets.float() - online).abs().max() > 0  # stored in fp16, not a copy of fp32
    other = teacher.targets(to_model_input(pixels[:6].flip(-1), SIZE), GRID)  # other crops: other targets
    assert not torch.allclose(targets[:6].float(), other, rtol=1e-2, atol=1e-2)

    everything, all_crops = TargetStore(tmp_path).load(FINGERPRINT, with_crops=True)
    rows = torch.from_numpy(items * K + views)
    assert torch.equal(everything[rows], targets) and torch.equal(all_crops[rows], crops)


def test_layout_on_disk(tmp_path, images) -> None:
    _compute(tmp_path, images)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == STORE_FORMAT and meta["fingerprint"] == FINGERPRINT
    assert (meta["num_items"], meta["views_per_item"], meta["num_rows"], meta["shard_size"]) == (8, 3, 24, 5)
    assert meta["crop_fields"] == ["top", "left", "height", "width", "flip"]
    names = [f"shard_0000{i}_{meta['layout']}.pt" for i in range(5)]
    assert sorted(p.name for p in tmp_path.glob("shard_*.pt")) == names
    payload = torch.load(TargetStore(tmp_path).shard_path(4), weights_only=True)
    assert (payload["index"], payload["start"], payload["stop"]) == (4, 20, 24)
    assert payload["targets"].shape == (4, 49, 48) and payload["crops"].shape == (4, 5)
    # Rows are item-major: row 20 = item 6, view 2.
    assert crops_to_views(payload["crops"][:1]) == [_view(6, 2)]
    # A view count is part of the layout: a different K recomputes everything.
    teacher = PatchTeacher()
    TargetStore(tmp_path).compute(
        FINGERPRINT,
        NUM_ITEMS,
        lambda a, b: _k2_batch(images, a, b),
        teacher,
        shard_size=SHARD,
        progress=False,
        views_per_item=2,
    )
    assert sum(teacher.calls) == 16 and len(list(tmp_path.glob("shard_*.pt"))) == 4
    assert TargetStore(tmp_path).reader().views_per_item == 2


def _k2_batch(images, start, stop):
    items, views = items_and_views(start, stop, 2)
    crops = [AUG.sample(SIZE, SIZE, view_rng(SEED, int(v), int(i))) for i, v in zip(items, views, strict=True)]
    pixels = torch.stack([AUG.apply(images[int(i)], c) for i, c in zip(items, crops, strict=True)])
    return to_model_input(pixels, SIZE), views_to_crops(crops)


# -- (b) resume ----------------------------------------------------------------------------------------------------
def test_crash_then_resume_computes_only_missing_shards(tmp_path, images) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        _compute(tmp_path, images, teacher=PatchTeacher(fail_after=4))  # 2 teacher calls per shard: 2 shards done
    store = TargetStore(tmp_path)
    assert sorted(tmp_path.glob("shard_*.pt")) == [store.shard_path(0), store.shard_path(1)]
    assert not list(tmp_path.glob(".*")) and not TargetStore(tmp_path).is_complete(FINGERPRINT)
    teacher, batches = _compute(tmp_path, images)
    assert batches.ranges == [(10, 13), (13, 15), (15, 18), (18, 20), (20, 23), (23, 24)]
    assert teacher.calls == [3, 2, 3, 2, 3, 1]
    assert TargetStore(tmp_path).is_complete(FINGERPRINT)
    fresh = tmp_path / "fresh"
    _compute(fresh, images)
    for a, b in zip(TargetStore(tmp_path).load(with_crops=True), TargetStore(fresh).load(with_crops=True), strict=True):
        assert torch.equal(a, b)


def test_progress_bar_counts_the_rank_rows(tmp_path, images, capsys) -> None:
    _compute(tmp_path, images, rank=1, world_size=2, progress=True)  # shards 1 and 3: 10 rows
    err = capsys.readouterr().err
    assert "teacher targets (rank 1/2)" in err and "10/10" in err


# -- (c) ranks -----------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from eva_pipeline.targets.store import TargetStore

    N, K, SHARD = 10, 3, 4  # 30 rows, 8 shards
    FINGERPRINT = {"teacher": "patches", "n": N}


    def batch_fn(start, stop):
        rows = torch.arange(start, stop)
        items, views = rows // K, rows % K
        images = torch.arange(N * 3 * 8 * 8, dtype=torch.float32).reshape(N, 3, 8, 8)[items] % 251
        crops = torch.stack([views, items % 3, 4 + views, 5 + items, (items + views) % 2], 1).to(torch.int32)
        return images + views.view(-1, 1, 1, 1), crops


    def teacher_fn(x):
        time.sleep(0.02)  # let the ranks interleave
        return F.unfold(x, kernel_size=4, stride=4).transpose(1, 2) * 0.5


    def run(root, rank, world_size, **kwargs):
        TargetStore(root).compute(FINGERPRINT, N, batch_fn, teacher_fn, SHARD, progress=False, batch_size=3,
                                  views_per_item=K, rank=rank, world_size=world_size, **kwargs)


    if __name__ == "__main__":
        root, rank, world_size, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        go.with_name(f"ready{rank}").touch()  # imports done: the test starts both ranks at once
        while not go.exists():
            time.sleep(0.002)
        run(root, rank, world_size)
    """
)


@pytest.fixture()
def worker(tmp_path) -> tuple[Path, dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return script, runpy.run_path(str(script))


def _stale_store(root: Path, worker_ns: dict) -> None:
    """A complete store of another fingerprint and layout (shard size 3), plus an old-format file and temporary."""
    TargetStore(root).compute(
        {"teacher": "old"},
        worker_ns["N"],
        worker_ns["batch_fn"],
        worker_ns["teacher_fn"],
        3,
        progress=False,
        views_per_item=worker_ns["K"],
    )
    (root / "shard_00000.pt").write_bytes(b"format 1")
    (root / ".shard_00001.pt.tmp4242").write_bytes(b"half")


def _assert_same_store(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_two_concurrent_rank_processes_over_a_stale_store(tmp_path, worker) -> None:
    script, ns = worker
    single = tmp_path / "single"
    ns["run"](single, 0, 1)
    shared, go = tmp_path / "shared", tmp_path / "go"
    _stale_store(shared, ns)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(shared), str(r), "2", str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both ranks start together, both seeing the stale meta.json
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert TargetStore(shared).is_complete(ns["FINGERPRINT"])
    _assert_same_store(shared, single)  # bitwise: meta.json and every shard; stale files all gone


def test_rank_that_still_sees_the_stale_meta_keeps_the_other_ranks_shards(tmp_path, worker) -> None:
    """The race concurrency allows: rank 1 reads the stale meta.json after rank 0 already wrote fresh shards."""
    _, ns = worker
    single = tmp_path / "single"
    ns["run"](single, 0, 1)
    shared = tmp_path / "shared"
    _stale_store(shared, ns)
    stale_meta = (shared / "meta.json").read_bytes()
    ns["run"](shared, 0, 2)
    fresh = {p.name: p.stat().st_mtime_ns for p in shared.glob("shard_*.pt")}
    assert len(fresh) == 4 and not TargetStore(shared).is_complete(ns["FINGERPRINT"])
    (shared / "meta.json").write_bytes(stale_meta)  # what rank 1 sees if it read meta.json before rank 0 wrote it
    ns["run"](shared, 1, 2)
    assert all((shared / name).stat().st_mtime_ns == t for name, t in fresh.items())  # rank 0's shards untouched
    _assert_same_store(shared, single)
    # A later run with a different world size resumes the same store: nothing to compute.
    calls = []
    ns["run"](shared, 0, 3)
    TargetStore(shared).compute(
        ns["FINGERPRINT"],
        ns["N"],
        ns["batch_fn"],
        lambda x: calls.append(x) or x,
        4,
        progress=False,
        views_per_item=ns["K"],
        rank=2,
        world_size=3,
    )
    assert calls == []
    _assert_same_store(shared, single)


def test_resume_of_one_crashed_rank(tmp_path, worker) -> None:
    _, ns = worker
    ns["run"](tmp_path, 0, 2)
    calls = []

    def crashing(x):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(x.shape[0])
        return ns["teacher_fn"](x)

    with pytest.raises(RuntimeError, match="simulated crash"):
        TargetStore(tmp_path).compute(
            ns["FINGERPRINT"],
            ns["N"],
            ns["batch_fn"],
            crashing,
            4,
            progress=False,
            batch_size=3,
            views_per_item=ns["K"],
            rank=1,
            world_size=2,
        )
    store = TargetStore(tmp_path)
    assert store.missing_shards(store.read_meta()) == [3, 5, 7]  # rank 1 finished shard 1 only
    with pytest.raises(TargetStoreError, match=r"incomplete: 3 of 8 shard\(s\) missing \(shard_00003_\w+\.pt, "):
        store.reader()
    calls.clear()
    store.compute(
        ns["FINGERPRINT"],
        ns["N"],
        ns["batch_fn"],
        lambda x: calls.append(x.shape[0]) or ns["teacher_fn"](x),
        4,
        progress=False,
        batch_size=3,
        views_per_item=ns["K"],
        rank=1,
        world_size=2,
    )
    assert calls == [3, 1, 3, 1, 2]  # shards 3, 5 (4 rows each, batches of 3) and 7 (2 rows)
    assert store.is_complete(ns["FINGERPRINT"])


# -- (d) reader ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path, worker) -> tuple[Path, dict]:
    _, ns = worker
    root = tmp_path / "store"
    ns["run"](root, 0, 1)
    return root, ns


def test_reader_bounded_lru_matches_load(store) -> None:
    root, ns = store
    everything, crops = TargetStore(root).load(ns["FINGERPRINT"], with_crops=True)
    reader = TargetStore(root).reader(ns["FINGERPRINT"], max_open_shards=2)
    assert reader.open_shards == (0,)  # shard 0 is opened to learn the shape
    rng = np.random.default_rng(1)
    for _ in range(20):
        items = rng.integers(0, ns["N"], size=5)
        views = rng.integers(0, ns["K"], size=5)
        targets, got_crops = reader.get(items, views)
        rows = torch.from_numpy(items * ns["K"] + views)
        assert torch.equal(targets, everything[rows]) and torch.equal(got_crops, crops[rows])
        assert len(reader.open_shards) <= 2
    targets, got_crops = reader.get(torch.tensor([4, 9]), 2)  # one view for all items; tensors accepted
    assert torch.equal(targets, everything[[14, 29]]) and torch.equal(got_crops, crops[[14, 29]])
    assert reader.get(np.array([], dtype=np.int64))[0].shape == (0, 4, 48)
    single, _ = reader.get(3, 1)
    assert torch.equal(single, everything[10:11])


def test_reader_pickles_without_shards_and_works_in_worker_processes(store) -> None:
    root, ns = store
    reader = TargetStore(root).reader()
    reader.get(np.arange(ns["N"]), 0)  # every shard touched
    data = pickle.dumps(reader)
    assert len(data) < 4096  # folder and layout only, no mapped tensors
    copy = pickle.loads(data)
    assert isinstance(copy, TargetReader) and copy.open_shards == ()
    for a, b in zip(copy.get([1, 7], [2, 0]), reader.get([1, 7], [2, 0]), strict=True):
        assert torch.equal(a, b)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return ns["N"] * ns["K"]

        def __getitem__(self, row):
            targets, crops = reader.get(row // ns["K"], row % ns["K"])
            return targets[0], crops[0]

    loader = torch.utils.data.DataLoader(Rows(), batch_size=7, num_workers=2)
    targets = torch.cat([t for t, _ in loader])
    assert torch.equal(targets, TargetStore(root).load())


def test_reader_names_a_corrupt_shard(store) -> None:
    root, _ns = store
    reader = TargetStore(root).reader()
    path = TargetStore(root).shard_path(3)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TargetStoreError, match=r"shard_00003_\w+\.pt is corrupt.*re-run the teacher_targets"):
        reader.get([5], 0)  # row 15 lies in shard 3
    # A well-formed shard holding other rows is caught too; shard 0 is checked when the reader opens.
    TargetStore(root).shard_path(0).write_bytes(TargetStore(root).shard_path(1).read_bytes())
    with pytest.raises(TargetStoreError, match=r"shard_00000_\w+\.pt is corrupt: it covers the wrong rows"):
        TargetStore(root).reader()


def test_reader_and_load_refuse_stale_incomplete_or_old_stores(store, tmp_path) -> None:
    root, ns = store
    with pytest.raises(TargetStoreError, match=r"different fingerprint \(differs in \['teacher'\]\)"):
        TargetStore(root).reader({**ns["FINGERPRINT"], "teacher": "other"})
    with pytest.raises(TargetStoreError, match="no target store at"):
        TargetStore(tmp_path / "none").reader()
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": 1, "fingerprint_hash": "x", "num_items": 3}))
    (old / "shard_00000.pt").write_bytes(b"old")
    for read in (TargetStore.load, TargetStore.reader):
        with pytest.raises(TargetStoreError, match=r"has format 1, this code reads format 2: re-run"):
            read(TargetStore(old))
    ns["run"](old, 0, 1)  # recomputing replaces the old store and its files
    assert not (old / "shard_00000.pt").exists() and TargetStore(old).is_complete(ns["FINGERPRINT"])


def test_shards_disagreeing_on_shape_or_crops_are_caught(store) -> None:
    root, ns = store
    path = TargetStore(root).shard_path(2)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "targets": payload["targets"][:, :, :10].contiguous()}, path)
    shape = r"shard_00002_\w+\.pt is corrupt: it has targets of shape \(4, 10\) per row, other shards have \(4, 48\)"
    with pytest.raises(TargetStoreError, match=shape):
        TargetStore(root).load()
    del payload["crops"]
    torch.save(payload, path)
    with pytest.raises(TargetStoreError, match=r"shard_00002_\w+\.pt is corrupt: it has no crops, other shards have"):
        TargetStore(root).reader().get([2, 3], 0)
    # compute's resume check also refuses to mix: the re-run recomputes it with crops.
    ns["run"](root, 0, 1)
    assert TargetStore(root).reader().get([2, 3], 0)[1] is not None


# -- (e) bad inputs --------------------------------------------------------------------------------------------------
def _run_with(tmp_path, batch_fn, **kwargs):
    kwargs = {"shard_size": 4, "progress": False, "views_per_item": 2, **kwargs}
    TargetStore(tmp_path).compute({"t": 1}, 3, batch_fn, lambda x: x.reshape(x.shape[0], 1, -1), **kwargs)


@pytest.mark.parametrize(
    ("crops", "message"),
    [
        (torch.zeros(4, 5, dtype=torch.int64), r"got torch\.int64 \(4, 5\)"),
        (torch.zeros(4, 4, dtype=torch.int32), r"got torch\.int32 \(4, 4\)"),
        (torch.ones(3, 5, dtype=torch.int32), r"got torch\.int32 \(3, 5\)"),
        (torch.tensor([[0, 0, 0, 1, 0]] * 4, dtype=torch.int32), "non-positive height/width"),
        (torch.tensor([[0, 0, 1, 1, 2]] * 4, dtype=torch.int32), "flip other than 0/1"),
        ([[0, 0, 1, 1, 0]] * 4, "got list"),
    ],
)
def test_bad_crops_are_refused(tmp_path, crops, message) -> None:
    with pytest.raises(ValueError, match=r"batch_fn: crops must be a torch\.int32 tensor \(4, 5\).*" + message):
        _run_with(tmp_path, lambda a, b: (torch.ones(b - a, 2), crops))
    assert not list(tmp_path.glob("shard_*.pt"))


def test_other_bad_inputs(tmp_path, store) -> None:
    good_crops = lambda n: torch.ones(n, 5, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError, match=r"images or \(images, crops\), got a tuple of 3"):
        _run_with(tmp_path, lambda a, b: (torch.ones(b - a, 2), good_crops(b - a), None))
    with pytest.raises(ValueError, match=r"batch_fn did not return crops for shard 1, unlike for earlier shards"):
        _run_with(tmp_path, lambda a, b: (torch.ones(b - a, 2), good_crops(b - a)) if a == 0 else torch.ones(b - a, 2))
    # Shard 0 (with crops) is on disk: a re-run under the same fingerprint without crops is told what went wrong.
    with pytest.raises(ValueError, match=r"did not return crops for shard 1.*made differently under the same finger"):
        _run_with(tmp_path, lambda a, b: torch.ones(b - a, 2))
    for kwargs, message in [
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\), got 2"),
        ({"views_per_item": 0}, "views_per_item must be a positive int, got 0"),
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            _run_with(tmp_path, lambda a, b: torch.ones(b - a, 2), **kwargs)

    root, _ns = store
    reader = TargetStore(root).reader()
    with pytest.raises(IndexError, match=r"view 3 out of range: the store at .* has 3 views"):
        reader.get([0, 1], [0, 3])
    with pytest.raises(IndexError, match=r"item 10 out of range: the store at .* has 10 items"):
        reader.get([10])
    with pytest.raises(IndexError, match="item -1 out of range"):
        reader.get(-1)
    with pytest.raises(TypeError, match="items must hold integers, got float64"):
        reader.get(np.array([1.0]))
    with pytest.raises(TypeError, match=r"views must hold integers, got a torch.float32 tensor"):
        reader.get([1], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="items and views must have the same length"):
        reader.get([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="max_open_shards must be a positive int"):
        TargetStore(root).reader(max_open_shards=0)
