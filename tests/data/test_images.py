"""load_images: manifest rows -> uint8 pixels equal to the source files, one read per container."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers.idx import read_idx, write_idx
from eva_pipeline.ingest.scan import SourceSpec
from eva_pipeline.loader import pixels as images_mod
from eva_pipeline.loader.pixels import load_images, split_location


def test_whole_embedded_manifest_matches_idx(embedded, fmnist) -> None:
    manifest, _ = embedded
    start = time.perf_counter()
    pixels = load_images(manifest, verify_hashes=True)
    elapsed = time.perf_counter() - start
    assert pixels.shape == (15000, 1, 28, 28) and pixels.dtype == torch.uint8
    train, test = read_idx(fmnist.train_images), read_idx(fmnist.test_images)
    for row in (0, 1, 4567, 9999):
        assert np.array_equal(pixels[row, 0].numpy(), train[row])
    for row in (0, 2500, 4999):
        assert np.array_equal(pixels[10000 + row, 0].numpy(), test[row])
    assert pixels[:10000].sum().item() == int(train.sum(dtype=np.int64))
    assert elapsed < 5.0, f"load_images took {elapsed:.2f}s for 15k IDX images"  # ~0.2 s when the machine is idle


def test_shuffled_subset_keeps_manifest_order(embedded, fmnist, monkeypatch) -> None:
    reads = []
    real = images_mod.read_idx
    monkeypatch.setattr(images_mod, "read_idx", lambda path: reads.append(path) or real(path))
    subset = embedded[0].sample(n=300, random_state=0)
    pixels = load_images(subset)
    assert len(reads) == 2  # each container decompressed once, not once per row
    train, test = read_idx(fmnist.train_images), read_idx(fmnist.test_images)
    for k, location in enumerate(subset["location"]):
        path, member = split_location(location)
        source = train if "train" in path else test
        assert np.array_equal(pixels[k, 0].numpy(), source[int(member)])


def test_relative_locations_resolve_against_root(tmp_path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "sub" / "x.idx", array)
    manifest = pd.DataFrame(
        {"id": ["s/1", "s/0"], "location": ["sub/x.idx#1", "sub/x.idx#0"], "width": [5, 5], "height": [3, 3]}
    )
    pixels = load_images(manifest, root=tmp_path)
    assert pixels.shape == (2, 1, 3, 5) and np.array_equal(pixels[:, 0].numpy(), array[::-1])


def test_plain_files_through_pil_and_mixed_channels(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")  # grayscale file: PIL converts to RGB
    gray = rng.integers(0, 256, size=(1, 6, 4), dtype=np.uint8)
    write_idx(tmp_path / "g.idx", gray)
    manifest = pd.DataFrame(
        {
            "id": ["c", "g", "i"],
            "location": [str(tmp_path / "c.png"), str(tmp_path / "g.png"), f"{tmp_path / 'g.idx'}#0"],
            "width": [4, 4, 4],
            "height": [6, 6, 6],
        }
    )
    pixels = load_images(manifest)
    assert pixels.shape == (3, 3, 6, 4)
    assert np.array_equal(pixels[0].permute(1, 2, 0).numpy(), rgb)
    for row, expected in ((1, rgb[..., 0]), (2, gray[0])):  # grayscale replicated to the 3 channels
        for c in range(3):
            assert np.array_equal(pixels[row, c].numpy(), expected)


def test_stale_or_broken_manifests_are_reported(tmp_path) -> None:
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    write_idx(tmp_path / "x.idx", array)
    manifest, _ = build_manifest([SourceSpec("x", "idx", "pretrain", tmp_path / "x.idx")])
    assert np.array_equal(load_images(manifest, verify_hashes=True)[:, 0].numpy(), array)
    with pytest.raises(ValueError, match="disagree with the image size 3x3"):
        load_images(manifest.assign(width=manifest["width"] + 1))
    write_idx(tmp_path / "x.idx", array[::-1].copy())  # same shape, new content
    with pytest.raises(ValueError, match=r"content of 'x/0' .* does not match its content_hash"):
        load_images(manifest, verify_hashes=True)
    with pytest.raises(ValueError, match="index out of range for 2 images"):
        load_images(manifest.assign(location=[f"{tmp_path / 'x.idx'}#5"] * 2))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_images(manifest.assign(location=[str(tmp_path / "none.png")] * 2))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png: cannot decode"):
        load_images(manifest.assign(location=[str(tmp_path / "bad.png")] * 2))


def test_split_location() -> None:
    assert split_location("a/b.idx.gz#12") == ("a/b.idx.gz", "12")
    assert split_location("shard-0001.tar#img/x.jpg") == ("shard-0001.tar", "img/x.jpg")
    assert split_location("plain.png") == ("plain.png", None)
