"""Moving Fashion-MNIST: the demo's synthetic, deterministic stand-in for Kinetics-400/600/700 (real H.264 clips).

No labelled action clips exist offline, so the demo makes its own: a Fashion-MNIST item, shrunk to ``item_size``,
moves on a black ``size`` x ``width`` canvas (square unless ``width`` is given) along one of eight :data:`MOTIONS` for
``frames`` frames. A class is (item group, motion): 3 :data:`GROUPS` x 8 motions = 24 classes (e.g.
``"footwear zooming in"``).

What one frame reveals (why the set needs a video model): the canvas is a torus (an item leaving one side comes
back on the other) and every clip's centre is uniform on it, so the item's position in any single frame has the
same distribution for every motion. Item sizes are log-uniform in :data:`SCALE_RANGE` for all motions; a zoom sweeps
its size by a factor in :data:`ZOOM_RANGE` symmetrically about the middle of the clip, so the middle frames' sizes
have the same distribution for ``zoom_in`` and ``zoom_out`` but the first frames do not (a zoom-in starts small):
one first frame tells zoom-in from zoom-out about 70 % of the time, left from right, up from down and clockwise
from anticlockwise 50 % (``tests/data/test_moving_fashion_mnist.py`` measures both). The item reveals its group,
which is part of the label. Per-clip jitter (centre, size, travel, orbit radius and turn, start angle, zoom factor)
is drawn from ``(seed, source, image index, motion)``; frames are exact (see :func:`render`).

Kinetics-like packaging (:func:`generate`): three overlapping versions like K400/K600/K700 (:data:`VERSIONS`: 16,
20 and 24 classes, nested), one class renamed in the largest (:data:`ALIASES`, as K700 renamed 'changing wheel'),
per version ``annotations/{train,validate}.csv`` (``label,youtube_id,time_start,time_end,split``) and clips at
``{split}/{label}/{youtube_id}_{start:06d}_{end:06d}.mp4`` (the layout of the ActivityNet Kinetics downloader).
Train clips render Fashion-MNIST train images, validation clips the t10k images. Like real Kinetics, versions share
clips (same id and times; most v400 train clips are in v600 and v700 train) and, on purpose, a few validation clips
of one version are training clips of the next (``leaks_per_class``), which the K722 merge must remove.
``sources.csv`` says which image each clip shows and how it moves; ``checksums.json`` holds every file's sha256.
The default set (1416 distinct clips in 3036 clip files, ~14 MB) takes ~5 s on one core.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from eva_pipeline.ingest.video import DEFAULT_CRF, decoded_digest, encode_video

#: The motions, in label-index order; a clip moves its item along one of them.
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "clockwise", "anticlockwise", "zoom_in", "zoom_out")
#: Motions that are each other's time reversal: one frame cannot tell them apart, a clip can.
MIRROR_PAIRS: tuple[tuple[str, str], ...] = (
    ("left", "right"),
    ("up", "down"),
    ("clockwise", "anticlockwise"),
    ("zoom_in", "zoom_out"),
)
#: The ten Fashion-MNIST classes, by label (https://github.com/zalandoresearch/fashion-mnist#labels).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: Item groups: Fashion-MNIST labels per group (the group is the "object" half of a class name).
GROUPS: dict[str, tuple[int, ...]] = {"tops": (0, 2, 3, 4, 6), "footwear": (5, 7, 9), "other": (1, 8)}
#: How a motion reads in a class name.
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "clockwise": "circling clockwise",
    "anticlockwise": "circling anticlockwise",
    "zoom_in": "zooming in",
    "zoom_out": "zooming out",
}
#: Old name -> new name: v400 and v600 call a class what v700 renamed (like K700's 'changing wheel (not on bike)').
ALIASES: dict[str, str] = {"tops going round clockwise": "tops circling clockwise"}
SPLITS: tuple[str, ...] = ("train", "validate")
CSV_COLUMNS: tuple[str, ...] = ("label", "youtube_id", "time_start", "time_end", "split")
SOURCES_COLUMNS: tuple[str, ...] = (
    "youtube_id", "time_start", "time_end", "source", "image_index", "fashion_label", "group", "motion",
)  # fmt: skip

#: Item side over ``item_size``, in any frame of any clip (log-uniform per clip).
SCALE_RANGE: tuple[float, float] = (0.55, 1.55)
#: Size factor a zoom sweeps over the clip.
ZOOM_RANGE: tuple[float, float] = (1.3, 1.45)
#: Distance a translation covers over the clip, as a fraction of the canvas side.
TRAVEL_RANGE: tuple[float, float] = (0.3, 0.5)
#: Orbit radius (fraction of the canvas side) and turns over the clip of ``clockwise`` / ``anticlockwise``.
ORBIT_RADIUS_RANGE: tuple[float, float] = (0.15, 0.25)
ORBIT_TURNS_RANGE: tuple[float, float] = (0.5, 0.8)
#: The range of ``time_start`` in the CSVs (seconds into the imaginary source video).
MAX_TIME_START: int = 600

_SOURCES: tuple[str, ...] = ("train", "test")  # Fashion-MNIST train images -> train clips, t10k -> validation clips
_PICK_TAG, _RENDER_TAG = 0x1D5E1, 0x40F10  # separate streams: which images, and how each clip moves
_WEIGHT_STEP = 256  # interpolation weights are multiples of 1/256: every sum is exact, frames identical everywhere


def class_name(group: str, motion: str) -> str:
    """The canonical (v700) name of the class (``group``, ``motion``), e.g. ``"tops moving left"``."""
    if group not in GROUPS or motion not in MOTIONS:
        raise ValueError(f"unknown group {group!r} or motion {motion!r} (groups {list(GROUPS)}, motions {MOTIONS})")
    return f"{group} {MOTION_PHRASES[motion]}"


#: Canonical class name -> (group, motion), for every class of the largest version.
_CLASS_PARTS: dict[str, tuple[str, str]] = {class_name(g, m): (g, m) for g in GROUPS for m in MOTIONS}
_OLD_NAMES: dict[str, str] = {new: old for old, new in ALIASES.items()}


def _version_classes(groups_motions: Sequence[tuple[str, str]], renamed: bool) -> tuple[str, ...]:
    names = (class_name(g, m) for g, m in groups_motions)
    return tuple(n if renamed else _OLD_NAMES.get(n, n) for n in names)


_V400 = [(g, m) for g in ("tops", "footwear") for m in MOTIONS]
_V600 = _V400 + [("other", m) for m in ("left", "right", "up", "down")]
#: Class names per version, as spelled in its CSVs: v400 (16) is in v600 (20), v600 in v700 (all 24, renamed).
VERSIONS: dict[str, tuple[str, ...]] = {
    "v400": _version_classes(_V400, renamed=False),
    "v600": _version_classes(_V600, renamed=False),
    "v700": _version_classes([(g, m) for g in GROUPS for m in MOTIONS], renamed=True),
}


def class_parts(name: str) -> dict[str, str] | None:
    """The two factors of a class: ``{"group": ..., "motion": ...}`` (old names understood), or None for an unknown
    name. What the demo's video report scores separately: the item (appearance) and the motion (time)."""
    parts = _CLASS_PARTS.get(ALIASES.get(name, name))
    return None if parts is None else {"group": parts[0], "motion": parts[1]}


def mirror_class(name: str, version: str | None = None) -> str | None:
    """The class with the same group and the mirrored motion (``"tops moving left"`` -> ``"tops moving right"``);
    old names are understood. With ``version``, the name as that version spells it, or None when it lacks the
    class; None for an unknown name."""
    parts = _CLASS_PARTS.get(ALIASES.get(name, name))
    if parts is None:
        return None
    group, motion = parts
    mirrored = next(b if a == motion else a for a, b in MIRROR_PAIRS if motion in (a, b))
    canonical = class_name(group, mirrored)
    if version is None:
        return canonical
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; expected one of {list(VERSIONS)}")
    for spelled in (canonical, _OLD_NAMES.get(canonical)):
        if spelled in VERSIONS[version]:
            return spelled
    return None


# ------------------------------------------------------------------------------------------------------ rendering
def item_image(image: np.ndarray, item_size: int) -> np.ndarray:
    """A (H, W) uint8 image shrunk to ``item_size`` x ``item_size`` (box filter: an area average) -> float64."""
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))  # 2-D uint8 -> mode L
    return np.asarray(pil.resize((item_size, item_size), Image.Resampling.BOX), dtype=np.float64)


def trajectory(
    motion: str, rng: np.random.Generator, *, frames: int, size: int, width: int | None = None
) -> tuple[np.ndarray, ...]:
    """Per-frame item centre (y, x), in canvas pixels on the ``size`` x ``width`` torus, and scale (item side /
    ``item_size``). Travel and orbit radius are fractions of the height (``size``) whatever the width.

    Eight uniforms are drawn whatever the motion, so the stream is the same shape for every clip. Image axes:
    x to the right, y down, so an angle that grows turns clockwise on screen."""
    width = size if width is None else width
    u = rng.random(8)
    t = np.arange(frames, dtype=np.float64) / (frames - 1) - 0.5  # -0.5 .. 0.5, symmetric about the middle frame
    cy, cx = np.full(frames, u[0] * size), np.full(frames, u[1] * width)
    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
    log_scale = np.full(frames, lo + u[2] * (hi - lo))
    travel = size * (TRAVEL_RANGE[0] + u[3] * (TRAVEL_RANGE[1] - TRAVEL_RANGE[0]))
    if motion in ("left", "right"):
        cx = cx + (travel if motion == "right" else -travel) * t
    elif motion in ("up", "down"):
        cy = cy + (travel if motion == "down" else -travel) * t
    elif motion in ("clockwise", "anticlockwise"):
        radius = size * (ORBIT_RADIUS_RANGE[0] + u[4] * (ORBIT_RADIUS_RANGE[1] - ORBIT_RADIUS_RANGE[0]))
        turns = ORBIT_TURNS_RANGE[0] + u[5] * (ORBIT_TURNS_RANGE[1] - ORBIT_TURNS_RANGE[0])
        angle = 2 * math.pi * (u[6] + (turns if motion == "clockwise" else -turns) * t)
        cy, cx = cy + radius * np.sin(angle), cx + radius * np.cos(angle)
    elif motion in ("zoom_in", "zoom_out"):
        sweep = math.log(ZOOM_RANGE[0] + u[7] * (ZOOM_RANGE[1] - ZOOM_RANGE[0]))
        middle = lo + sweep / 2 + u[2] * (hi - lo - sweep)  # the whole sweep stays inside SCALE_RANGE
        log_scale = middle + (sweep if motion == "zoom_in" else -sweep) * t
    else:
        raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
    return cy % size, cx % width, np.exp(log_scale)


def _sampling_matrices(centre: np.ndarray, scale: np.ndarray, size: int, item_size: int) -> np.ndarray:
    """(T, size, item_size) weights: canvas row (or column) p of frame t takes item rows with these weights.

    A triangle filter (bilinear when magnifying, widened to 1/scale when shrinking, against aliasing) at the item
    coordinate of p, the toroidal offset from the centre divided by the scale; rows normalised, then rounded to
    multiples of 1/256 so that the two matrix products below are exact in float64 (no summation-order effects)."""
    reach = math.ceil(1 / float(scale.min())) + 1
    taps = np.arange(-reach, item_size + reach, dtype=np.float64) + 0.5  # item pixel centres, with a margin
    pixel = np.arange(size, dtype=np.float64) + 0.5
    offset = np.mod(pixel[None, :] - centre[:, None] + size / 2, size) - size / 2  # (T, size), in [-size/2, size/2)
    coord = offset / scale[:, None] + item_size / 2  # (T, size) in item pixels
    width = np.maximum(1.0, 1.0 / scale)[:, None, None]
    weights = np.maximum(0.0, 1.0 - np.abs(coord[:, :, None] - taps[None, None, :]) / width)
    total = weights.sum(axis=2, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.rint(weights[:, :, reach : reach + item_size] * _WEIGHT_STEP) / _WEIGHT_STEP


def render(
    item: np.ndarray, cy: np.ndarray, cx: np.ndarray, scale: np.ndarray, size: int, width: int | None = None
) -> np.ndarray:
    """Frames of ``item`` (float (m, m)) centred at (cy, cx) with side ``scale * m`` -> uint8 (T, size, width).

    Item values are integers and the weights multiples of 1/256, so every product and sum is exact in float64:
    the frames are the same bytes on any machine, BLAS and summation order."""
    rows = _sampling_matrices(cy, scale, size, item.shape[0])
    cols = _sampling_matrices(cx, scale, size if width is None else width, item.shape[1])
    frames = rows @ item @ cols.transpose(0, 2, 1)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def render_clip(
    image: np.ndarray,
    motion: str,
    rng: np.random.Generator,
    *,
    frames: int = 16,
    size: int = 28,
    item_size: int = 14,
    width: int | None = None,
) -> np.ndarray:
    """One grayscale clip: ``image`` (H, W) uint8 shrunk to ``item_size``, moving along ``motion`` with the jitter
    drawn from ``rng`` -> uint8 (frames, size, width), width ``size`` by default."""
    _check_geometry(frames, size, item_size, width)
    cy, cx, scale = trajectory(motion, rng, frames=frames, size=size, width=width)
    return render(item_image(image, item_size), cy, cx, scale, size, width)


def _check_geometry(frames: int, size: int, item_size: int, width: int | None = None) -> None:
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (a motion needs two frames), got {frames}")
    if size < 2 or size % 2:
        raise ValueError(f"size must be even and >= 2 (H.264 yuv420p needs even sides), got {size}")
    if width is not None and (width < size or width % 2):
        raise ValueError(
            f"width must be even and >= size {size} (landscape, like Kinetics; H.264 yuv420p needs even sides), "
            f"got {width}"
        )
    if item_size < 1 or item_size * SCALE_RANGE[1] > size:
        raise ValueError(
            f"item_size {item_size} must be >= 1 and at most size / {SCALE_RANGE[1]} = {size / SCALE_RANGE[1]:.1f}: "
            "the largest item must fit on the canvas (which wraps around)"
        )


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Clip:
    """One rendered clip: which image (``source`` "train" or "test", ``image_index``) moves how, and its id."""

    source: str
    image_index: int
    fashion_label: int
    group: str
    motion: str
    youtube_id: str
    time_start: int
    time_end: int

    @property
    def stem(self) -> str:
        """The downloader's file name without ``.mp4``: ``<youtube_id>_<start:06d>_<end:06d>``."""
        return f"{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}"


def clip_identity(seed: int, source: str, image_index: int, motion: str, duration_s: int) -> tuple[str, int, int]:
    """(youtube_id, time_start, time_end) of a clip: 11 characters of [A-Za-z0-9_-] like a real id, and a start
    time, from a hash of (seed, source, image index, motion)."""
    digest = hashlib.sha256(f"moving-fashion-mnist:{seed}:{source}:{image_index}:{motion}".encode()).digest()
    youtube_id = base64.urlsafe_b64encode(digest[:9]).decode()[:11]
    start = int.from_bytes(digest[9:13], "big") % MAX_TIME_START
    return youtube_id, start, start + duration_s


def clip_rng(seed: int, clip: Clip) -> np.random.Generator:
    """The jitter stream of ``clip``: a function of (seed, source, image index, motion), the same in every version."""
    entropy = [seed, _RENDER_TAG, _SOURCES.index(clip.source), clip.image_index, MOTIONS.index(clip.motion)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _pools(
    labels: np.ndarray, source: str, pool_size: int, seed: int, duration_s: int
) -> dict[tuple[str, str], list[Clip]]:
    """``pool_size`` clips per (group, motion) from ``labels``: a seeded permutation of each group's images, split
    into one disjoint run per motion (an image moves one way only)."""
    pools: dict[tuple[str, str], list[Clip]] = {}
    for g, (group, members) in enumerate(GROUPS.items()):
        indices = np.flatnonzero(np.isin(labels, members))
        needed = pool_size * len(MOTIONS)
        if len(indices) < needed:
            raise ValueError(
                f"Moving Fashion-MNIST: the {source} images hold {len(indices)} of group {group!r} "
                f"({', '.join(FASHION_MNIST_CLASSES[c] for c in members)}), {needed} needed "
                f"({pool_size} clips x {len(MOTIONS)} motions); pass more images or fewer clips per class"
            )
        rng = np.random.default_rng(np.random.SeedSequence([seed, _PICK_TAG, _SOURCES.index(source), g]))
        chosen = rng.permutation(indices)[:needed].reshape(len(MOTIONS), pool_size)
        for m, motion in enumerate(MOTIONS):
            clips = []
            for index in chosen[m].tolist():
                youtube_id, start, end = clip_identity(seed, source, index, motion, duration_s)
                clips.append(Clip(source, index, int(labels[index]), group, motion, youtube_id, start, end))
            pools[group, motion] = clips
    return pools


def plan(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    train_per_class: int = 40,
    validate_per_class: int = 10,
    train_shift: int = 5,
    leaks_per_class: int = 1,
    duration_s: int = 2,
) -> dict[str, dict[str, list[tuple[str, Clip]]]]:
    """version -> split -> [(label as the version spells it, clip)], sorted by (label, youtube_id); no I/O.

    A class in ``r`` earlier versions takes train clips ``[r*train_shift, r*train_shift + train_per_class)`` of its
    train pool and validation clips ``[r*leaks, r*leaks + validate_per_class)`` of its validation pool, plus, as
    deliberate leakage, the ``leaks`` validation clips of the previous version that left its validation window.
    """
    versions_of: dict[str, list[str]] = {}
    for version, names in VERSIONS.items():
        for name in names:
            versions_of.setdefault(ALIASES.get(name, name), []).append(version)
    depth = max(len(v) for v in versions_of.values()) - 1
    train_pools = _pools(train_labels, "train", train_per_class + depth * train_shift, seed, duration_s)
    val_pools = _pools(test_labels, "test", validate_per_class + depth * leaks_per_class, seed, duration_s)
    out: dict[str, dict[str, list[tuple[str, Clip]]]] = {v: {s: [] for s in SPLITS} for v in VERSIONS}
    for canonical, versions in versions_of.items():
        key = _CLASS_PARTS[canonical]
        for r, version in enumerate(versions):
            label = canonical if canonical in VERSIONS[version] else _OLD_NAMES[canonical]
            train = train_pools[key][r * train_shift : r * train_shift + train_per_class]
            leaked = val_pools[key][(r - 1) * leaks_per_class : r * leaks_per_class] if r else []
            val = val_pools[key][r * leaks_per_class : r * leaks_per_class + validate_per_class]
            out[version]["train"] += [(label, clip) for clip in train + leaked]
            out[version]["validate"] += [(label, clip) for clip in val]
    for splits in out.values():
        for rows in splits.values():
            rows.sort(key=lambda row: (row[0], row[1].youtube_id))
    return out


# -------------------------------------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _check_source(images: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"Moving Fashion-MNIST: {name} images must be uint8 (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Moving Fashion-MNIST: {name} labels must be integers of shape ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"Moving Fashion-MNIST: {name} labels must be Fashion-MNIST labels 0..9")
    return images, labels


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` over ``out``: an old ``out`` is moved aside first and then removed."""
    old = out.with_name(f".{out.name}.old{os.getpid()}-{secrets.token_hex(4)}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def generate(
    out_dir: str | os.PathLike[str],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    frames: int = 16,
    size: int = 28,
    item_size: int = 14,
    width: int | None = None,
    fps: int = 8,
    train_per_class: int = 40,
    validate_per_class: int = 10,
    train_shift: int = 5,
    leaks_per_class: int = 1,
    crf: int = DEFAULT_CRF,
) -> dict[str, Any]:
    """Write the three versions (CSVs, clips), ``sources.csv`` (what each clip shows) and ``checksums.json``
    under ``out_dir``; -> a summary (classes and clips per version and split, unique clips, leaked clips).

    Everything is written into a temporary folder beside ``out_dir`` and renamed over it at the end. The same
    inputs give identical files: ``checksums.json`` holds the sha256 of every CSV and clip (one FFmpeg build) and
    the digest of each clip's decoded frames (:func:`~eva_pipeline.ingest.video.decoded_digest`, any build)."""
    train_images, train_labels = _check_source(train_images, train_labels, "train")
    test_images, test_labels = _check_source(test_images, test_labels, "test")
    _check_geometry(frames, size, item_size, width)
    counts = {"train_per_class": train_per_class, "validate_per_class": validate_per_class}
    counts |= {"train_shift": train_shift, "leaks_per_class": leaks_per_class}
    if min(counts.values()) < 0 or min(train_per_class, validate_per_class, fps) < 1:
        raise ValueError(f"Moving Fashion-MNIST: clip counts must be >= 0 and per-class counts and fps >= 1: {counts}")
    duration_s = math.ceil(frames / fps)
    layout = plan(train_labels, test_labels, seed=seed, duration_s=duration_s, **counts)
    params = {"seed": seed, "frames": frames, "size": size, "item_size": item_size, "fps": fps, "crf": crf} | counts
    if width is not None:  # square sets keep the checksums of before
        params["width"] = width
    images = {"train": train_images, "test": test_images}

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        staging = tmp / ".staging"
        unique: dict[str, Clip] = {}
        for splits in layout.values():
            for rows in splits.values():
                unique.update((clip.stem, clip) for _, clip in rows)
        decoded: dict[str, str] = {}
        for stem, clip in unique.items():
            gray = render_clip(
                images[clip.source][clip.image_index], clip.motion, clip_rng(seed, clip),
                frames=frames, size=size, item_size=item_size, width=width,
            )  # fmt: skip
            path = encode_video(staging / f"{stem}.mp4", np.repeat(gray[..., None], 3, axis=3), fps=fps, crf=crf)
            decoded[stem] = decoded_digest(path)
        files: dict[str, str] = {}
        for version, splits in layout.items():
            for split, rows in splits.items():
                csv_path = tmp / version / "annotations" / f"{split}.csv"
                csv_rows = [(label, c.youtube_id, c.time_start, c.time_end, split) for label, c in rows]
                _write_csv(csv_path, CSV_COLUMNS, csv_rows)
                files[csv_path.relative_to(tmp).as_posix()] = _sha256(csv_path)
                for label, clip in rows:
                    dest = tmp / version / split / label / f"{clip.stem}.mp4"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(staging / f"{clip.stem}.mp4", dest)
                    files[dest.relative_to(tmp).as_posix()] = _sha256(dest)
        shutil.rmtree(staging)
        sources = [
            (c.youtube_id, c.time_start, c.time_end, c.source, c.image_index, c.fashion_label, c.group, c.motion)
            for c in sorted(unique.values(), key=lambda c: c.stem)
        ]
        _write_csv(tmp / "sources.csv", SOURCES_COLUMNS, sources)
        files["sources.csv"] = _sha256(tmp / "sources.csv")
        record = {
            "generator": __name__,
            "params": params,
            "pyav": av.__version__,
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "files": dict(sorted(files.items())),
            "decoded_frames": dict(sorted(decoded.items())),
        }
        (tmp / "checksums.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(layout, len(unique), params)


def _summary(layout: dict[str, dict[str, list[tuple[str, Clip]]]], unique: int, params: dict) -> dict[str, Any]:
    versions: dict[str, Any] = {}
    validation = {c.stem for splits in layout.values() for _, c in splits["validate"]}
    for version, splits in layout.items():
        versions[version] = {
            "classes": len(VERSIONS[version]),
            "clips": {split: len(rows) for split, rows in splits.items()},
            "train_clips_in_some_validation": sum(c.stem in validation for _, c in splits["train"]),
        }
    return {"versions": versions, "unique_clips": unique, "aliases": dict(ALIASES), "params": params}
