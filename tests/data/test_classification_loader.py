"""Labelled fine-tuning / evaluation batches (eva_pipeline.loader.classification)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from eva_pipeline.finetune.augment import eval_transform, train_transform
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.classification import (
    ClassificationDataset,
    classification_loader,
    sample_seed,
    seeded_call,
    to_pil,
)
from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.pixels import TensorPixels
from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD

N, SIZE = 10, 8


def index_images(n: int = N, channels: int = 1, size: int = SIZE) -> torch.Tensor:
    """uint8 (n, C, size, size) whose every pixel of image i is 20 * i + 7 (decodable after any resize/crop)."""
    return (
        (torch.arange(n, dtype=torch.int64) * 20 + 7).to(torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size)
    )


def decode(images: torch.Tensor) -> torch.Tensor:
    """Eval-transformed (B, 3, H, W) -> the image index each came from (all three channels must agree)."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    values = (images * std + mean) * 255
    per_channel = values.mean(dim=(2, 3))
    assert torch.allclose(per_channel, per_channel[:, :1].expand(-1, 3), atol=0.5), "channels differ"
    return ((per_channel[:, 0] - 7) / 20).round().to(torch.int64)


def labels_of(n: int = N) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) * 3 + 1


def train_dataset(seed: int = 0) -> ClassificationDataset:
    return ClassificationDataset(
        TensorPixels(index_images(16, 1, 16)), labels_of(16), train_transform(16, (0.08, 1.0)), seed
    )


def epoch_batches(dataset: ClassificationDataset, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in classification_loader(dataset, 4, **kwargs)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_same_seed_gives_identical_batches_for_any_workers_and_after_restart():
    first = epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=0)
    again = epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=0)
    workers = epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=0, num_workers=2)
    assert_same(first, again)
    assert_same(first, workers)
    # a run that went through epochs 0 and 1 == a fresh process restarted at epoch 1
    dataset = train_dataset()
    epoch_batches(dataset, shuffle=True, seed=5, epoch=0)
    assert_same(
        epoch_batches(dataset, shuffle=True, seed=5, epoch=1),
        epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=1),
    )
    # the augmentation really is random: another dataset seed changes the images of the same order
    other = epoch_batches(train_dataset(seed=1), shuffle=True, seed=5, epoch=0)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other, strict=True))
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(first, other, strict=True))


def test_another_epoch_gives_another_order_and_augmentation():
    e0 = epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=0)
    e1 = epoch_batches(train_dataset(), shuffle=True, seed=5, epoch=1)
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    # the order is EpochOrder's, documented
    assert torch.equal(torch.cat([y for _, y in e1]), labels_of(16)[EpochOrder(16, 5).epoch(1)])
    dataset = train_dataset()
    dataset.set_epoch(0)
    image0 = dataset[3][0]
    dataset.set_epoch(1)
    assert not torch.equal(image0, dataset[3][0])


def test_item_is_seeded_call_with_a_pure_function_of_seed_epoch_index():
    dataset = train_dataset(seed=9)
    dataset.set_epoch(2)
    image = to_pil(index_images(16, 1, 16)[4])
    expected = seeded_call(dataset.transform, image, sample_seed(9, 2, 4))
    torch.manual_seed(123)  # the global RNG state does not matter
    assert torch.equal(dataset[4][0], expected)
    assert sample_seed(9, 2, 4) == sample_seed(9, 2, 4) != sample_seed(9, 2, 5)
    assert len({sample_seed(9, 2, 4), sample_seed(9, 3, 4), sample_seed(8, 2, 4)}) == 3


def test_evaluation_loader_visits_every_item_once_in_order_without_randomness():
    tf = eval_transform(SIZE)
    dataset = ClassificationDataset(index_images(), labels_of(), tf, seed=0)
    batches = epoch_batches(dataset, shuffle=False, seed=0, epoch=0)
    assert [len(y) for _, y in batches] == [4, 4, 2]  # drop_last defaults to False for evaluation
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(decode(images), torch.arange(N))
    assert torch.equal(labels, labels_of())
    unseeded = torch.stack([tf(to_pil(p)) for p in index_images()])
    assert torch.equal(images, unseeded)
    other = ClassificationDataset(index_images(), labels_of(), tf, seed=77)
    assert torch.equal(torch.cat([x for x, _ in epoch_batches(other, shuffle=False, seed=3, epoch=4)]), images)


def test_shuffled_labels_line_up_with_images_and_drop_last_batches_are_full():
    dataset = ClassificationDataset(index_images(), labels_of(), eval_transform(SIZE), seed=0)
    loader = classification_loader(dataset, 4, shuffle=True, seed=2, epoch=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and all(len(y) == 4 and x.shape[0] == 4 for x, y in batches)
    seen = []
    for images, labels in batches:
        assert labels.dtype == torch.int64
        index = decode(images)
        assert torch.equal(labels, labels_of()[index])
        seen += index.tolist()
    assert len(set(seen)) == 8 and seen != sorted(seen)
    assert seen == EpochOrder(N, 2).epoch(0)[:8].tolist()
    with pytest.raises(ValueError, match="no full batch"):
        classification_loader(dataset, 16, shuffle=True)


def test_grayscale_input_reaches_the_transform_as_an_image_it_converts_to_rgb():
    gray = ClassificationDataset(index_images(channels=1), labels_of(), eval_transform(SIZE))
    rgb = ClassificationDataset(index_images(channels=3), labels_of(), eval_transform(SIZE))
    assert to_pil(index_images(channels=1)[0]).mode == "L"
    image, label = gray[5]
    assert image.shape == (3, SIZE, SIZE) and label.item() == 16
    assert torch.equal(image, rgb[5][0])
    assert decode(image[None]).item() == 5


def test_labels_are_checked():
    images = index_images()
    with pytest.raises(ValueError, match="no label"):
        ClassificationDataset(images, pd.Series([1] * (N - 1) + [None], dtype="Int64"), eval_transform(SIZE))
    with pytest.raises(ValueError, match="9 labels for 10"):
        ClassificationDataset(images, torch.zeros(9, dtype=torch.int64), eval_transform(SIZE))
    with pytest.raises(ValueError, match="integers"):
        ClassificationDataset(images, torch.zeros(N), eval_transform(SIZE))
    with pytest.raises(ValueError, match="non-negative"):
        ClassificationDataset(images, -torch.ones(N, dtype=torch.int64), eval_transform(SIZE))


def test_manifest_backed_dataset_on_embedded_fashion_mnist(fmnist):
    manifest, _ = build_manifest(fmnist.specs(train_limit=16, test_limit=40))
    rows = manifest[manifest["split"] == "probe"].reset_index(drop=True)
    assert len(rows) == 40
    dataset = ClassificationDataset.from_manifest(rows, eval_transform(28), seed=0)
    batches = epoch_batches(dataset, shuffle=False)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 28, 28)] * 10
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.as_tensor(rows["label"].to_numpy(dtype=np.int64)))
    assert torch.equal(labels, torch.as_tensor(read_idx(fmnist.test_labels)[:40].astype(np.int64)))
    # the pixels are the IDX file's, in manifest order
    raw = torch.from_numpy(np.array(read_idx(fmnist.test_images)[:40]))[:, None]
    expected = torch.stack([eval_transform(28)(to_pil(p)) for p in raw])
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    train = epoch_batches(
        ClassificationDataset.from_manifest(rows, train_transform(28, (0.08, 1.0))), shuffle=True, seed=1
    )
    assert len(train) == 10 and all(x.shape == (4, 3, 28, 28) for x, _ in train)
