"""Image normalisation shared by student and teacher (EVA-01: both see the same crop, normalised with CLIP's
mean/std, so the tensors are identical)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: modules that only need the constants stay light (kedro registry/viz)
    import torch

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: EVA-01 resizes student and teacher inputs bicubically; antialias matches PIL when downscaling (and the
#: teachers' resize).
RESIZE_MODE: str = "bicubic"
RESIZE_ANTIALIAS: bool = True


def to_model_input(images: torch.Tensor, size: int, *, chunk_size: int = 256) -> torch.Tensor:
    """uint8 images (N, C, H, W), C in {1, 3} -> CLIP-normalised float32 (N, 3, size, size) on the same device.

    Grayscale is replicated to 3 channels only when writing the output, so any resize runs on one channel. The
    bicubic resize happens only when (H, W) != (size, size); its result is clamped and rounded to 0..255 so the
    output equals resizing the uint8 image first (as PIL/torchvision do in the official pipeline) and then
    normalising.
    Works chunk by chunk straight into the preallocated output: peak extra memory is one float chunk.
    """
    import torch
    import torch.nn.functional as F

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    if size < 1 or chunk_size < 1:
        raise ValueError(f"size and chunk_size must be positive, got size={size}, chunk_size={chunk_size}")
    n, channels, height, width = images.shape
    out = torch.empty((n, 3, size, size), dtype=torch.float32, device=images.device)
    # (x / 255 - mean) / std == x * scale - shift, with Python scalars per channel: broadcasting a (1, 3, 1, 1)
    # tensor or mixing uint8 and float in one op hits slow TensorIterator paths on CPU (about 400x slower).
    scales = [1.0 / (255.0 * s) for s in CLIP_STD]
    shifts = [m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    resize = (height, width) != (size, size)
    for start in range(0, n, chunk_size):
        x = images[start : start + chunk_size].float()
        if resize:
            x = F.interpolate(x, size=(size, size), mode=RESIZE_MODE, align_corners=False, antialias=RESIZE_ANTIALIAS)
            x = x.clamp_(0.0, 255.0).round_()
        dst = out[start : start + chunk_size]
        for c in range(3):
            channel = dst[:, c]
            torch.mul(x[:, 0 if channels == 1 else c], scales[c], out=channel)
            channel.sub_(shifts[c])
    return out


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """One uint8 image (C, H, W) -> (C, size, size) uint8 with the resize :func:`to_model_input` uses (bicubic,
    antialiased, clamped and rounded), so a loader that resizes early gives the same model input as resizing late."""
    import torch
    import torch.nn.functional as F

    if image.shape[-2:] == (size, size):
        return image
    x = F.interpolate(
        image[None].float(), size=(size, size), mode=RESIZE_MODE, align_corners=False, antialias=RESIZE_ANTIALIAS
    )
    return x.clamp_(0.0, 255.0).round_()[0].to(torch.uint8)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """One (n, C, H, W) batch of same-size uint8 images; grayscale ones are broadcast to the widest channel count."""
    import torch

    channels = max(im.shape[0] for im in images)
    return torch.stack([im.expand(channels, -1, -1) for im in images])
