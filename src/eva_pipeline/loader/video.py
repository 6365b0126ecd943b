"""Video clips for fine-tuning and testing (EVA-01 ``video/datasets/build.py``): frame sampling, clip transforms and
map-style clip datasets.

- Sampling. Training is TSN's: the video's frames split into ``T`` equal segments, one random frame from each
  (:func:`tsn_indices`). Testing takes ``num_clips`` deterministic temporal views (:func:`uniform_view_indices`):
  the public code drew its test views with the *random* training sampling (a defect: evaluation changed from run
  to run); ours spread each clip's frame evenly inside the same segments.
- Transforms work on decoded uint8 (T, H, W, 3) clips and return float (C, T, H, W), normalised with ``mean`` /
  ``std`` (the official video code uses ImageNet's, :data:`VIDEO_MEAN`; the image stages use CLIP's). Every
  frame of a clip gets the same crop, flip and colour change. Training: TSN's multi-scale crop at a fixed
  position, resized to ``img_size`` (:func:`train_clip_transform`). Testing: the short side resized to
  ``img_size``, then left/centre/right crops (top/centre/bottom for portrait videos; :func:`spatial_crops`).
- :class:`VideoClipDataset` (one clip per item, training or 1x1 evaluation) and :class:`VideoViewsDataset` (every
  temporal x spatial view of a clip per item, for 4x3 testing). Everything random is a pure function of
  ``(seed, epoch, index)`` (a private ``numpy.random.Generator``), so batches do not depend on workers or restarts;
  both hold only their rows and decode one clip per item (memory flat in the number of clips).

Frames are decoded by ``decode(path, indices) -> uint8 (len(indices), H, W, 3)``, by default
``eva_pipeline.ingest.video.decode_frames`` (imported on first use). It raises ``VideoError`` (a ``ValueError``
with a ``reason``) for a clip it cannot read; any ``ValueError`` from ``decode`` is treated that way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from eva_pipeline.loader.classification import labels_tensor

log = logging.getLogger(__name__)

#: ``decode(path, indices)`` -> uint8 (len(indices), H, W, 3); raises ``VideoError`` (a ``ValueError``).
Decode = Callable[[Path, Sequence[int]], np.ndarray]

#: The official video code normalises with ImageNet's mean/std (``img_norm_cfg`` in ``datasets/build.py``).
VIDEO_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
VIDEO_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD
#: ``MultiScaleCrop(scales=(1, 0.875, 0.75, 0.66), max_wh_scale_gap=1)``: crop sides as fractions of the short side.
MULTISCALE_SCALES: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
#: The official probabilities (``AUG.COLOR_JITTER``, ``AUG.GRAY_SCALE``); our defaults are 0 (off).
OFFICIAL_COLOR_JITTER: float = 0.8
OFFICIAL_GRAYSCALE: float = 0.2
#: ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)`` of the official pipeline.
JITTER_STRENGTH: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
#: Test views: 4 temporal clips x 3 spatial crops (the paper's Kinetics test; ``TEST.NUM_CLIP``, ``TEST.NUM_CROP``).
TEST_CLIPS: int = 4
TEST_CROPS: int = 3

_VIDEO_TAG: int = 0x71DE0  # mixed into every per-item seed: no stream shared with the order, masks or images
_MAX_WH_SCALE_GAP = 1
_FLIP_PROB = 0.5
_UINT8_MAX = 255.0
_CROP_COUNTS = (1, 3)
_REQUIRED_COLUMNS = ("path", "num_frames")


class BadClip(NamedTuple):
    """A clip that did not decode: its path and the decoder's reason (a ``(path, reason)`` tuple)."""

    path: str
    reason: str


# ---------------------------------------------------------------------------------------------------------- sampling


def _check_counts(num_video_frames: int, num_segments: int) -> tuple[int, int]:
    n, t = int(num_video_frames), int(num_segments)
    if n < 1:
        raise ValueError(f"a video needs at least one frame, got num_video_frames={num_video_frames}")
    if t < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    return n, t


def tsn_indices(num_video_frames: int, num_segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """TSN sampling (EVA-01 ``SampleFrames``): ``num_segments`` frame indices, one per equal segment, in order.

    With ``rng`` (training) a uniform frame of each segment, segment ``i`` being frames ``floor(i N / T)`` up to
    ``floor((i + 1) N / T)`` (exclusive): the segments cover every frame (the official ``N // T``-frame segments
    drop the last ``N mod T``) and the indices strictly increase. Without (testing) the frame at each segment's
    middle, ``floor((i + 0.5) N / T)``, exactly the official test sampling. A video with fewer frames than
    segments repeats frames, by that same deterministic formula even in training.
    """
    n, t = _check_counts(num_video_frames, num_segments)
    if rng is None or n < t:
        return uniform_view_indices(n, t, 1)[0]
    bounds = (np.arange(t + 1, dtype=np.int64) * n) // t
    return bounds[:-1] + rng.integers(0, bounds[1:] - bounds[:-1])


def strided_indices(num_video_frames: int, num_segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Like :func:`tsn_indices`, but one random offset for every segment (the same frame of each segment): the
    frames stay evenly spaced, so the motion between two sampled frames is the same all through the clip. TSN's
    independent draws space them anywhere from 1 to 2N/T - 1 frames apart, which hides motion (what the demo's
    Moving Fashion-MNIST classes are) from a short fine-tune. Without ``rng`` the test sampling, as TSN's."""
    n, t = _check_counts(num_video_frames, num_segments)
    if rng is None or n < t:
        return uniform_view_indices(n, t, 1)[0]
    bounds = (np.arange(t + 1, dtype=np.int64) * n) // t
    return bounds[:-1] + rng.integers(0, int((bounds[1:] - bounds[:-1]).min()))


#: Training frame sampling by name: TSN (EVA's) or evenly spaced with one random offset.
TEMPORAL_SAMPLING = {"tsn": tsn_indices, "strided": strided_indices}


def uniform_view_indices(num_video_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """Deterministic test clips: (num_clips, num_segments) frame indices, clip ``c`` taking in segment ``i`` the
    frame shown at ``(i + (c + 0.5) / num_clips) N / T`` (time in frames): the clips interleave evenly inside the
    TSN segments and together cover the video, each runs forward in time.

    One clip is :func:`tsn_indices` without ``rng`` (the official test sampling). The official multi-clip test
    drew every clip with the random training sampling instead (non-deterministic evaluation, not reproduced).
    Videos shorter than ``num_segments`` repeat frames.
    """
    n, t = _check_counts(num_video_frames, num_segments)
    c = int(num_clips)
    if c < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    clip = np.arange(c, dtype=np.int64)[:, None]
    segment = np.arange(t, dtype=np.int64)[None, :]
    return ((segment * 2 * c + 2 * clip + 1) * n) // (2 * t * c)


def middle_view(num_clips: int, num_crops: int) -> int:
    """Position of the 1x1 view among ``num_clips * num_crops`` (clip-major): the centre crop of clip
    ``num_clips // 2``. With an odd ``num_clips`` that clip is the segment middles of :func:`tsn_indices`."""
    return (num_clips // 2) * num_crops + num_crops // 2


# -------------------------------------------------------------------------------------------------------- transforms


def _check_clip(clip: np.ndarray) -> None:
    if not isinstance(clip, np.ndarray) or clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        shape = getattr(clip, "shape", None)
        raise ValueError(f"expected a uint8 (T, H, W, 3) clip, got {getattr(clip, 'dtype', type(clip))} {shape}")
    if 0 in clip.shape:
        raise ValueError(f"the clip is empty: shape {clip.shape}")


def _as_float(clip: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in 0..255."""
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()


def _resize(frames: Tensor, height: int, width: int) -> Tensor:
    """Bilinear with antialias on (T, 3, H, W) in 0..255, clamped and rounded (as resizing uint8 frames)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    out = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, _UINT8_MAX).round_()


def _normalise(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(T, 3, H, W) in 0..255 -> (3, T, H, W) float32, ``(x / 255 - mean) / std``."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need three values (std positive), got {tuple(mean)} and {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * _UINT8_MAX
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * _UINT8_MAX
    return ((frames - m) / s).permute(1, 0, 2, 3).contiguous()


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def _crop_offsets(length: int, size: int, n: int) -> list[int]:
    if n == 1:
        return [(length - size) // 2]
    return [0, (length - size) // 2, length - size]


def resized_views(frames: np.ndarray, size: int, n: int = TEST_CROPS) -> tuple[Tensor, list[tuple[int, int]]]:
    """The test geometry: frames resized (short side ``size``, float (T, 3, H', W') in 0..255) and the (top, left)
    of each of its ``n`` crops of ``size`` x ``size``: left, centre, right for landscape, top, centre, bottom for
    portrait (the official ``ThreeCrop`` orders them left, right, centre)."""
    _check_clip(frames)
    if n not in _CROP_COUNTS:
        raise ValueError(f"n (spatial crops) must be one of {_CROP_COUNTS}, got {n}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = _short_side_size(frames.shape[1], frames.shape[2], size)
    resized = _resize(_as_float(frames), height, width)
    if height <= width:
        return resized, [(0, left) for left in _crop_offsets(width, size, n)]
    return resized, [(top, 0) for top in _crop_offsets(height, size, n)]


def spatial_crops(
    clip: np.ndarray,
    size: int,
    n: int = TEST_CROPS,
    *,
    mean: Sequence[float] = VIDEO_MEAN,
    std: Sequence[float] = VIDEO_STD,
) -> Tensor:
    """Test crops of a uint8 (T, H, W, 3) clip: float (n, C, T, size, size), ``n`` 1 (centre) or 3 (see
    :func:`resized_views`), each normalised."""
    resized, boxes = resized_views(clip, size, n)
    return torch.stack([_normalise(resized[:, :, y : y + size, x : x + size], mean, std) for y, x in boxes])


def multiscale_crop_box(
    height: int, width: int, rng: np.random.Generator, scales: Sequence[float] = MULTISCALE_SCALES
) -> tuple[int, int, int, int]:
    """TSN's ``GroupMultiScaleCrop`` as EVA-01's ``MultiScaleCrop(random_crop=False)``: (top, left, h, w).

    Crop sides are ``scales`` of the short side, width and height at most one scale level apart, the box at one of
    five fixed positions (four corners, centre). Draws exactly two integers from ``rng``. The official pipeline
    first resizes the short side to 256/224 x ``img_size``; the box is relative to the short side, so we crop the
    decoded frame and resize once (the official snap of a side within 3 pixels of ``img_size`` is left out).
    """
    if not scales or min(scales) <= 0 or max(scales) > 1:
        raise ValueError(f"scales must be fractions in (0, 1], got {tuple(scales)}")
    sides = [max(1, int(min(height, width) * s)) for s in scales]
    candidates = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= _MAX_WH_SCALE_GAP]
    h, w = candidates[int(rng.integers(len(candidates)))]
    w_step, h_step = (width - w) // 4, (height - h) // 4
    positions = [(0, 0), (0, 4 * w_step), (4 * h_step, 0), (4 * h_step, 4 * w_step), (2 * h_step, 2 * w_step)]
    top, left = positions[int(rng.integers(len(positions)))]
    return top, left, h, w


def _color_jitter(frames: Tensor, rng: np.random.Generator, apply: bool) -> Tensor:
    """torchvision's ``ColorJitter`` with the official strengths, one draw for the whole clip (the official code
    drew new factors for every frame, a flicker no video has). Parameters are always drawn, so turning the jitter
    on or off leaves every other draw of the item alone."""
    from torchvision.transforms.v2 import functional as TF

    b, c, s, h = JITTER_STRENGTH
    factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h))
    order = rng.permutation(4)
    if not apply:
        return frames
    x = frames / _UINT8_MAX
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in order.tolist():
        x = ops[k](x, float(factors[k]))
    return x.clamp_(0.0, 1.0) * _UINT8_MAX


def _check_probabilities(**probabilities: float) -> None:
    for name, p in probabilities.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")


def train_clip_transform(
    clip: np.ndarray,
    rng: np.random.Generator,
    *,
    img_size: int,
    mean: Sequence[float] = VIDEO_MEAN,
    std: Sequence[float] = VIDEO_STD,
    scales: Sequence[float] = MULTISCALE_SCALES,
    hflip: bool = True,
    color_jitter: float = 0.0,
    grayscale: float = 0.0,
) -> Tensor:
    """The training augmentation of a uint8 (T, H, W, 3) clip -> float (C, T, img_size, img_size), normalised.

    :func:`multiscale_crop_box`, resized to ``img_size`` x ``img_size`` (bilinear, antialiased), flipped with
    p 0.5 when ``hflip``, colour-jittered with probability ``color_jitter`` and made grey with ``grayscale``
    (official 0.8 and 0.2; default off), identically on every frame. ``hflip`` defaults to the official recipe;
    turn it off when classes are mirror images of each other: flipping a clip turns "moving something left" into
    "moving something right". Every draw is made whatever the flags, so the flags change nothing else.
    """
    _check_clip(clip)
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    _check_probabilities(color_jitter=color_jitter, grayscale=grayscale)
    top, left, h, w = multiscale_crop_box(clip.shape[1], clip.shape[2], rng, scales)
    flip = bool(rng.random() < _FLIP_PROB)
    jitter = bool(rng.random() < color_jitter)
    grey = bool(rng.random() < grayscale)
    frames = _resize(_as_float(clip[:, top : top + h, left : left + w]), img_size, img_size)
    if hflip and flip:
        frames = frames.flip(-1)
    frames = _color_jitter(frames, rng, jitter)
    if grey:
        from torchvision.transforms.v2 import functional as TF

        frames = TF.rgb_to_grayscale(frames, num_output_channels=3)
    return _normalise(frames, mean, std)


# ---------------------------------------------------------------------------------------------------------- datasets


def item_rng(seed: int, epoch: int, index: int, clip: int) -> np.random.Generator:
    """The generator of item ``index`` at ``epoch`` when it shows clip ``clip`` (itself, or the clip replacing a
    bad one): a pure function of the four."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), int(clip), _VIDEO_TAG]))


def default_decode() -> Decode:
    """``eva_pipeline.ingest.video.decode_frames``, imported when first needed."""
    from eva_pipeline.ingest.video import decode_frames  # on use: the loader imports without the video reader

    return decode_frames


def _check_rows(rows: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(rows, pd.DataFrame):
        raise TypeError(f"rows must be a pandas DataFrame, got {type(rows).__name__}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"the clip rows lack column(s) {missing}; have {list(rows.columns)}")
    counts = pd.to_numeric(rows["num_frames"], errors="coerce")
    bad = rows.loc[counts.isna() | (counts < 1), "path"]
    if len(bad):
        raise ValueError(
            f"{len(bad)} clip(s) have no positive num_frames, e.g. {bad.iloc[0]!r}: drop them or re-ingest them"
        )
    return pd.DataFrame({"path": rows["path"].astype(str).to_numpy(), "num_frames": counts.to_numpy(dtype=np.int64)})


class _ClipRows:
    """Shared by both datasets: rows, labels, decoding, the bad-clip record, and an optional cache of decoded clips.

    With ``cache_bytes > 0`` a clip's first decode decodes all its frames and keeps them (uint8) while the cache holds
    fewer than ``cache_bytes``; later epochs slice them instead of decoding again. Memory stays bounded by the budget,
    not by the number of clips (clips past it are decoded as without a cache). The frames are the same either way, so
    batches do not depend on it. With DataLoader workers each worker fills its own copy for one epoch."""

    def __init__(
        self,
        rows: pd.DataFrame,
        labels: Any,
        root: str | Path | None,
        decode: Decode | None,
        cache_bytes: int = 0,
    ) -> None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.rows = _check_rows(rows)
        if labels is None:
            if "label" not in rows.columns:
                raise ValueError("the clip rows have no 'label' column and no labels were given")
            labels = rows["label"]
        if isinstance(labels, pd.Series):
            missing = self.rows["path"][labels.isna().to_numpy()]
            if len(missing):
                raise ValueError(f"{len(missing)} clip(s) have no label, e.g. {missing.iloc[0]!r}: label or drop them")
            labels = labels.to_numpy(dtype=np.int64, copy=True)
        self.labels = labels_tensor(labels, len(self.rows))
        self.root = None if root is None else Path(root)
        self.decode = decode
        #: (path, reason) of every clip that failed to decode in this process. With DataLoader workers each worker
        #: fills its own copy (lost with the worker): the log has every failure.
        self.bad_clips: list[BadClip] = []
        self.cache_bytes = int(cache_bytes)
        #: clip index -> all its decoded frames (uint8 (num_frames, H, W, 3)), while they fit in ``cache_bytes``.
        self.cached: dict[int, np.ndarray] = {}
        self.cached_bytes = 0
        self.cache_full = cache_bytes == 0

    def __len__(self) -> int:
        return len(self.rows)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} clips")
        return index

    def path(self, index: int) -> Path:
        path = Path(self.rows["path"].iat[index])
        return path if self.root is None else self.root / path

    def num_frames(self, index: int) -> int:
        return int(self.rows["num_frames"].iat[index])

    def decode_unique(self, index: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | BadClip:
        """Clip ``index``'s distinct frames among ``indices`` (uint8 (F, H, W, 3), each decoded once, in one call)
        and, for every entry of ``indices``, its row among them; or the :class:`BadClip` when the decoder refuses
        the clip (recorded and logged)."""
        decode = self.decode or default_decode()
        path = self.path(index)
        unique, inverse = np.unique(indices, return_inverse=True)
        whole = self._whole_clip(index, decode, path, int(unique[-1]) if len(unique) else -1)
        if whole is not None:
            return whole[unique], inverse.reshape(indices.shape)
        try:
            frames = decode(path, unique.tolist())
        except ValueError as err:  # VideoError is a ValueError
            bad = BadClip(str(path), str(getattr(err, "reason", err)))
            if bad not in self.bad_clips:
                self.bad_clips.append(bad)
            log.warning("clip %s does not decode (%s)", bad.path, bad.reason)
            return bad
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape[:1] != unique.shape:
            raise ValueError(
                f"decode returned {getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')} for "
                f"{len(unique)} frames of {path}; expected uint8 ({len(unique)}, H, W, 3)"
            )
        _check_clip(frames)
        return frames, inverse.reshape(indices.shape)

    def _whole_clip(self, index: int, decode: Decode, path: Path, last: int) -> np.ndarray | None:
        """Every frame of clip ``index`` from the cache, or decoded into it while the budget lasts; None when the
        cache is off or full, or the whole clip does not decode (the caller then decodes what it needs, as without a
        cache, and reports a bad clip the same way)."""
        if index in self.cached:
            return self.cached[index]
        count = self.num_frames(index)
        if self.cache_full or last >= count:
            return None
        try:
            frames = decode(path, list(range(count)))
        except ValueError:
            return None
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape[:1] != (count,):
            return None
        _check_clip(frames)
        if self.cached_bytes + frames.nbytes > self.cache_bytes:
            self.cache_full = True  # from here on clips are decoded as without a cache
            return frames
        self.cached[index] = frames
        self.cached_bytes += frames.nbytes
        return frames


class VideoClipDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(clip (C, T, H, W) float, label int64)``, one clip of ``num_frames`` frames.

    ``rows``: a frame with ``path`` (relative to ``root`` when given), ``num_frames`` (frames in the video) and,
    unless ``labels`` is given, ``label``. Training (``train``): :func:`tsn_indices` with :func:`item_rng`
    ``(seed, epoch, i, i)`` and :func:`train_clip_transform` (``hflip``, ``scales``, ``color_jitter``,
    ``grayscale`` as there). ``hflip`` defaults to the official recipe; turn it off when classes are mirror
    images of each other (flipping a clip turns "moving left" into "moving right" without changing its label).
    Evaluation: the 1x1 view, segment middles (the official one-clip test sampling) and the centre crop of the
    short side resized to ``img_size``; no randomness. (:class:`VideoViewsDataset`'s middle view is the same
    when its ``num_clips`` is odd; with 4 clips it is clip 2, 5/8 into each segment.)

    A clip that does not decode does not stop the run: item ``i`` becomes the next clip in dataset order that
    decodes (drawn with ``item_rng(seed, epoch, i, j)``, so still deterministic), a warning names the path and
    reason, and :attr:`bad_clips` lists it (with DataLoader workers, in the workers' copies: read the log). Works
    with :func:`~eva_pipeline.loader.classification.classification_loader` (``set_epoch``, ``len``).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        labels: Any = None,
        *,
        num_frames: int,
        img_size: int,
        train: bool,
        seed: int = 0,
        root: str | Path | None = None,
        mean: Sequence[float] = VIDEO_MEAN,
        std: Sequence[float] = VIDEO_STD,
        hflip: bool = True,
        scales: Sequence[float] = MULTISCALE_SCALES,
        color_jitter: float = 0.0,
        grayscale: float = 0.0,
        sampling: str = "tsn",
        decode: Decode | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if num_frames < 1 or img_size < 1:
            raise ValueError(f"num_frames and img_size must be >= 1, got {num_frames} and {img_size}")
        if sampling not in TEMPORAL_SAMPLING:
            raise ValueError(f"sampling must be one of {sorted(TEMPORAL_SAMPLING)}, got {sampling!r}")
        self.sample = TEMPORAL_SAMPLING[sampling]
        _check_probabilities(color_jitter=color_jitter, grayscale=grayscale)
        self.clips = _ClipRows(rows, labels, root, decode, cache_bytes)
        self.num_frames, self.img_size, self.train = int(num_frames), int(img_size), bool(train)
        self.seed, self.epoch = int(seed), 0
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.scales = bool(hflip), tuple(scales)
        self.color_jitter, self.grayscale = float(color_jitter), float(grayscale)

    @property
    def bad_clips(self) -> list[BadClip]:
        return self.clips.bad_clips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def _clip(self, index: int, clip: int) -> Tensor | None:
        rng = item_rng(self.seed, self.epoch, index, clip) if self.train else None
        decoded = self.clips.decode_unique(clip, self.sample(self.clips.num_frames(clip), self.num_frames, rng))
        if isinstance(decoded, BadClip):
            return None
        frames = decoded[0][decoded[1]]
        if rng is None:
            return spatial_crops(frames, self.img_size, 1, mean=self.mean, std=self.std)[0]
        return train_clip_transform(
            frames,
            rng,
            img_size=self.img_size,
            mean=self.mean,
            std=self.std,
            scales=self.scales,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            grayscale=self.grayscale,
        )

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = self.clips._check_index(index)
        count = len(self)
        for step in range(count):
            clip = (index + step) % count
            out = self._clip(index, clip)
            if out is not None:
                if step:
                    log.warning("item %d shows clip %s instead", index, self.clips.path(clip))
                return out, self.clips.labels[clip]
        raise RuntimeError(f"none of the {count} clips decodes (first failure: {self.bad_clips[:1]}); check the data")

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        return [self[i] for i in indices]


class VideoViewsDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(views (V, C, T, H, W) float, label int64)``, every test view of clip ``i``:
    ``num_clips`` temporal clips (:func:`uniform_view_indices`) x ``num_crops`` spatial crops
    (:func:`spatial_crops`), clip-major (view ``c * num_crops + s``; the 1x1 view is :func:`middle_view`).

    Deterministic (no seed). Each clip is decoded once, all its distinct frames in one call, and resized once.
    A clip that does not decode is skipped, not replaced: the item is its :class:`BadClip` (a warning names it;
    :attr:`bad_clips` lists it, in the workers' copies with DataLoader workers), and
    :func:`eva_pipeline.evaluation.video.multiview_probs` scores the others and says how many.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        labels: Any = None,
        *,
        num_frames: int,
        img_size: int,
        num_clips: int = TEST_CLIPS,
        num_crops: int = TEST_CROPS,
        root: str | Path | None = None,
        mean: Sequence[float] = VIDEO_MEAN,
        std: Sequence[float] = VIDEO_STD,
        decode: Decode | None = None,
    ) -> None:
        if num_frames < 1 or img_size < 1 or num_clips < 1:
            raise ValueError(
                f"num_frames, img_size and num_clips must be >= 1, got {num_frames}, {img_size}, {num_clips}"
            )
        if num_crops not in _CROP_COUNTS:
            raise ValueError(f"num_crops must be one of {_CROP_COUNTS}, got {num_crops}")
        self.clips = _ClipRows(rows, labels, root, decode)
        self.num_frames, self.img_size = int(num_frames), int(img_size)
        self.num_clips, self.num_crops = int(num_clips), int(num_crops)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def bad_clips(self) -> list[BadClip]:
        return self.clips.bad_clips

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    @property
    def middle_view(self) -> int:
        return middle_view(self.num_clips, self.num_crops)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do (the views are fixed); here so any loader that sets epochs can take the dataset."""

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | BadClip:
        index = self.clips._check_index(index)
        indices = uniform_view_indices(self.clips.num_frames(index), self.num_frames, self.num_clips)
        decoded = self.clips.decode_unique(index, indices)
        if isinstance(decoded, BadClip):
            return decoded
        frames, rows = decoded
        resized, boxes = resized_views(frames, self.img_size, self.num_crops)  # each distinct frame resized once
        resized = resized[torch.from_numpy(rows)]  # (clips, T, 3, H', W')
        size = self.img_size
        views = [
            _normalise(resized[c, :, :, y : y + size, x : x + size], self.mean, self.std)
            for c in range(self.num_clips)
            for y, x in boxes
        ]
        return torch.stack(views), self.clips.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor] | BadClip]:
        return [self[i] for i in indices]
