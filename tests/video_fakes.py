"""Synthetic video clips for the video loader and evaluation tests (on the pytest path, ``pythonpath = ["tests"]``).

Frames come from a fake decoder that synthesises them: channel 0 is the frame index (mod 256), channel 1 ten times
the video number, channel 2 a left-to-right ramp; so a transformed clip says which frames, which video and which way
round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eva_pipeline.loader.video import VIDEO_MEAN, VIDEO_STD

HEIGHT, WIDTH = 24, 40


class FakeVideoError(ValueError):
    """Stands in for ``eva_pipeline.ingest.video.VideoError`` (a ValueError with a reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def synthetic_frames(video: int, indices, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    frames[..., 0] = (np.asarray(indices) % 256).astype(np.uint8)[:, None, None]
    frames[..., 1] = 10 * video
    frames[..., 2] = np.linspace(0, 255, width).round().astype(np.uint8)[None, None, :]
    return frames


@dataclass
class FakeDecode:
    """decode(path, indices) for videos named ``v<number>.mp4``; names in ``bad`` fail; every call is recorded."""

    bad: frozenset[str] = frozenset()
    height: int = HEIGHT
    width: int = WIDTH
    calls: list[tuple[str, list[int]]] = field(default_factory=list)

    def __call__(self, path, indices) -> np.ndarray:
        self.calls.append((str(path), list(indices)))
        name = Path(path).name
        if name in self.bad:
            raise FakeVideoError(f"moov atom not found in {name}")
        return synthetic_frames(int(name[1:].split(".")[0]), indices, self.height, self.width)


def clip_rows(n: int = 6, frames: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {"path": [f"clips/v{i}.mp4" for i in range(n)], "num_frames": frames + np.arange(n), "label": np.arange(n) % 3}
    )


def unnormalise(clip: torch.Tensor) -> torch.Tensor:
    """(..., C, T, H, W) normalised -> pixel values 0..255."""
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1, 1)
    return (clip * std + mean) * 255
