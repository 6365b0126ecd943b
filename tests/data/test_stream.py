"""The streaming batch loader: order, sharding over ranks and workers, row/pixel access, views and masks."""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from eva_pipeline.loader.augment import RandomResizedCropFlip, View, view_rng
from eva_pipeline.loader.batches import BatchPlan, PretrainBatches, batch_loader, batch_masks
from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.pixels import ManifestPixels, PixelReader, TensorPixels, load_images
from eva_pipeline.loader.rows import FrameRows, ParquetRows
from eva_pipeline.masking import BlockMaskGenerator


# ------------------------------------------------------------------------------------------------------- order
@pytest.mark.parametrize("n", [1, 10, 37, 64, 100])
def test_every_epoch_is_a_permutation_and_positions_agree(n):
    order = EpochOrder(n, seed=3)
    for epoch in range(3):
        full = order.epoch(epoch)
        assert sorted(full.tolist()) == list(range(n))
        cuts = sorted({0, n, *np.random.default_rng(epoch).integers(0, n + 1, size=4).tolist()})
        pieces = [EpochOrder(n, 3).indices(epoch, a, b) for a, b in itertools.pairwise(cuts)]
        np.testing.assert_array_equal(np.concatenate(pieces), full)  # random access == the sequential order
    assert n < 3 or not np.array_equal(order.epoch(0), order.epoch(1))


def test_consecutive_positions_come_from_all_over_the_data_set():
    """No locality left in the order (the former block-windowed order kept whole blocks of 100 rows together)."""
    full = EpochOrder(10_000, seed=0).epoch(0)
    touched = [len(np.unique(full[w * 500 : (w + 1) * 500] // 100)) for w in range(20)]
    expected = 100 * (1 - (1 - 1 / 100) ** 500)  # blocks of 100 hit by 500 uniform draws: 99.3
    assert abs(np.mean(touched) - expected) < 1.0
    spans = [np.ptp(full[w * 500 : (w + 1) * 500]) for w in range(20)]
    assert min(spans) > 9_000


def test_small_data_gets_a_uniform_permutation():
    counts = np.zeros((6, 6))
    for seed in range(3000):
        counts[np.arange(6), EpochOrder(6, seed).epoch(0)] += 1
    assert np.abs(counts / 3000 - 1 / 6).max() < 0.04


def test_bad_order_arguments():
    with pytest.raises(ValueError, match="positive"):
        EpochOrder(0, 0)
    with pytest.raises(ValueError, match="outside"):
        EpochOrder(5, 0).indices(0, 3, 9)


# -------------------------------------------------------------------------------------------------------- rows
def _manifest(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"s/{i}" for i in range(n)],
            "location": [f"img_{i}.png" for i in range(n)],
            "width": np.arange(n, dtype=np.int32) + 10,
            "height": np.arange(n, dtype=np.int32) + 20,
            "split": ["probe" if i % 7 == 3 else "pretrain" for i in range(n)],
        }
    )


def test_parquet_rows_equal_frame_rows_in_any_order(tmp_path):
    df = _manifest(1000)
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pandas(df), path, row_group_size=64)
    rows = ParquetRows(path, "pretrain")
    frame = FrameRows(df[df["split"] == "pretrain"])
    assert len(rows) == len(frame) == int((df["split"] == "pretrain").sum())
    rng = np.random.default_rng(0)
    columns = ["location", "width", "height"]
    for _ in range(10):
        idx = rng.integers(0, len(rows), size=25)
        got, want = rows.rows(idx), frame.rows(idx)
        pd.testing.assert_frame_equal(
            got[columns].reset_index(drop=True), want.reset_index(drop=True), check_dtype=False
        )
        assert (got["member_offset"] == -1).all()  # plain files: no tar member span
    clone = pickle.loads(pickle.dumps(rows))  # what a DataLoader worker gets: a path, maps opened there
    assert clone.index._maps is None
    assert clone.rows(np.array([5])).iloc[0]["location"] == frame.rows([5]).iloc[0]["location"]
    with pytest.raises(IndexError, match="out of range"):
        rows.rows(np.array([len(rows)]))


# ------------------------------------------------------------------------------------------------------ pixels
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pixel_reader_reads_tar_members_by_index_and_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(8 + i, 12, 3), dtype=np.uint8) for i in range(6)]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, a in enumerate(arrays):
            data = _png(a)
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "loose.png").write_bytes(_png(arrays[0]))
    reader = PixelReader(tmp_path)
    got = reader.read(["00000.tar#0003.png", "loose.png", "00000.tar#0005.png", "00000.tar#0000.png"])
    for item, k in zip(got, [3, 0, 5, 0], strict=True):
        np.testing.assert_array_equal(item, arrays[k])
    with pytest.raises(ValueError, match="not found"):
        reader.read(["00000.tar#9999.png"])


def test_pixel_reader_caches_idx_and_equals_load_images(embedded):
    manifest, _ = embedded
    rows = manifest.sample(n=50, random_state=1)
    reader = PixelReader(max_containers=1)
    got = reader.read(rows["location"].tolist())
    want = load_images(rows)
    for k, item in enumerate(got):
        np.testing.assert_array_equal(item[..., 0], want[k, 0].numpy())
    assert len(reader._cache) == 1  # bounded: the two IDX files never both held
    assert not pickle.loads(pickle.dumps(reader))._cache


# ----------------------------------------------------------------------------------------------------- batches
def _plan(images, rank=0, world=1, batch=8, **kw):
    masker = BlockMaskGenerator(grid=(4, 4), num_masking_patches=6, min_num_patches=2)
    return BatchPlan(
        pixels=TensorPixels(images),
        order=EpochOrder(len(images), 5),
        global_batch=batch,
        rank=rank,
        world_size=world,
        img_size=16,
        seed=5,
        masker=masker,
        **kw,
    )


@pytest.fixture
def images():
    return torch.randint(0, 256, (40, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_ranks_split_the_global_batch_and_share_its_token_count(images):
    one = PretrainBatches(_plan(images, batch=8), 0, 10)
    ranks = [PretrainBatches(_plan(images, rank=r, world=2, batch=8), 0, 10) for r in range(2)]
    for step in range(10):  # 5 steps per epoch: crosses an epoch boundary
        whole = one.batch(step)
        parts = [r.batch(step) for r in ranks]
        torch.testing.assert_close(torch.cat([p.indices for p in parts]), whole.indices)
        torch.testing.assert_close(torch.cat([p.images for p in parts]), whole.images)
        torch.testing.assert_close(torch.cat([p.mask for p in parts]), whole.mask)
        assert parts[0].num_masked == parts[1].num_masked == int(whole.mask.sum())
    epoch0 = torch.cat([one.batch(s).indices for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))


def test_workers_deliver_the_same_batches_in_step_order(images):
    plan = _plan(images, view_mode="augment", augment=RandomResizedCropFlip(16))
    inline = list(batch_loader(plan, 3, 11, num_workers=0))
    workers = list(batch_loader(plan, 3, 11, num_workers=2))
    assert [b.step for b in workers] == list(range(3, 11))
    for a, b in zip(inline, workers, strict=True):
        torch.testing.assert_close(a.images, b.images)
        torch.testing.assert_close(a.mask, b.mask)


def test_views_and_masks_are_pure_functions_of_seed_epoch_index(images):
    augment = RandomResizedCropFlip(16)
    plan = _plan(images, view_mode="augment", augment=augment)
    batch = PretrainBatches(plan, 0, 10).batch(7)  # epoch 1
    for k, i in enumerate(batch.indices.tolist()):
        view = augment.sample(20, 24, view_rng(5, 1, i))
        torch.testing.assert_close(batch.images[k], augment.apply(images[i], view))
    torch.testing.assert_close(batch.mask, batch_masks(plan.masker, 5, 1, batch.indices.numpy()))
    resized = PretrainBatches(_plan(images), 0, 10).batch(0)
    assert resized.images.shape == (8, 3, 16, 16) and resized.images.dtype == torch.uint8


class _FakeStore:
    """A target-store reader stand-in: K views per item with known crops and targets."""

    views_per_item, has_crops = 2, True

    def __init__(self, n):
        self.num_items = n
        gen = torch.Generator().manual_seed(1)
        self.crops = torch.stack(
            [
                torch.tensor([[1 + v, 2 + v, 10 + i % 5, 12, (i + v) % 2] for v in range(2)], dtype=torch.int32)
                for i in range(n)
            ]
        )
        self.targets = torch.randn(n, 2, 16, 4, generator=gen).half()

    def get(self, items, view):
        items = torch.as_tensor(np.asarray(items))
        return self.targets[items, view], self.crops[items, view]


def test_stored_views_use_the_crop_stored_with_the_target(images):
    store = _FakeStore(len(images))
    plan = _plan(images, view_mode="stored", augment=RandomResizedCropFlip(16), targets=store)
    for step in (0, 6):  # epochs 0 and 1: views 0 and 1
        batch = PretrainBatches(plan, 0, 10).batch(step)
        view = step // 5 % 2
        for k, i in enumerate(batch.indices.tolist()):
            top, left, h, w, flip = store.crops[i, view].tolist()
            want = RandomResizedCropFlip(16).apply(images[i], View(top, left, h, w, bool(flip)))
            torch.testing.assert_close(batch.images[k], want)
        torch.testing.assert_close(batch.targets, store.targets[batch.indices, view])


def test_plan_rejects_inconsistent_settings(images):
    with pytest.raises(ValueError, match="divisible"):
        _plan(images, world=3, batch=8)
    with pytest.raises(ValueError, match="needs stored targets with crops"):
        _plan(images, view_mode="stored")
    with pytest.raises(ValueError, match="cover 3 images"):
        store = _FakeStore(3)
        _plan(images, view_mode="stored", targets=store)
    with pytest.raises(ValueError, match="exceeds"):
        PretrainBatches(_plan(images[:4]), 0, 1)


def test_manifest_pixels_stream_the_embedded_demo(embedded, tmp_path):
    manifest, _ = embedded
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, row_group_size=1000)
    pixels = ManifestPixels(ParquetRows(path, "pretrain"))
    want = load_images(manifest[manifest["split"] == "pretrain"].iloc[[0, 4321, 9999]])
    got = pixels(np.array([0, 4321, 9999]))
    torch.testing.assert_close(torch.stack(got), want)


def test_resizing_in_the_loader_equals_resizing_the_batch(images):
    from eva_pipeline.loader.transforms import to_model_input

    batch = PretrainBatches(_plan(images), 0, 5).batch(2)
    late = to_model_input(images[batch.indices], 16)  # what the loop did before batches were resized per image
    torch.testing.assert_close(to_model_input(batch.images, 16), late, rtol=0, atol=0)


def test_order_memory_does_not_grow_with_the_data_set():
    """Merged-30M: the order of any step is found with memory of one batch of positions, not of 29.6M indices."""
    import tracemalloc

    def peak_bytes(n: int) -> int:
        tracemalloc.start()
        order = EpochOrder(n, seed=0)
        for epoch, start in ((0, 0), (3, n // 2), (7, n - 5000)):
            got = order.indices(epoch, start, start + 4096)
            assert len(got) == 4096 and got.min() >= 0 and got.max() < n
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, huge = peak_bytes(2_000_000), peak_bytes(29_600_000)
    assert huge < 1.5 * small and huge < 2**20  # a few uint64 arrays of 4096 positions (32 KiB each)
