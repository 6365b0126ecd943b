"""Video files through PyAV: probe (every rejection has a reason), decode chosen frames, encode deterministically.

PyAV (``av``) bundles FFmpeg in its wheels, so decoding needs no system FFmpeg (torchvision's video reader is gone
and torchcodec needs a matching system FFmpeg). Three functions, used by video ingestion, the clip loader and the
synthetic demo set:

- :func:`probe_video` decodes the whole first video stream to count frames: container headers lie (Kinetics clips
  cut by the downloader often declare more frames than they hold), and a clip that fails halfway should be rejected
  at ingestion, not in the middle of training. Failures raise :class:`VideoError` with one of :data:`REASONS`.
- :func:`decode_frames` decodes once, sequentially, up to the largest requested index and keeps only the requested
  frames (in the requested order, repeats allowed): memory is the output array, not the clip.
- :func:`encode_video` writes H.264 in MP4 (yuv420p), atomically, with the same bytes for the same frames.

Threads: decoding and encoding use one thread. Clips are small, the data loader parallelises across worker
processes (threads inside each worker would oversubscribe the cores), and x264 is only deterministic single-threaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np

from eva_pipeline.fileio import replace_atomically

UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
ZERO_LENGTH = "zero_length"
TOO_SHORT = "too_short"
CORRUPT = "corrupt"
#: The stable reason codes of :class:`VideoError` (recorded by video ingestion next to each rejected clip).
REASONS: tuple[str, ...] = (UNREADABLE, NO_VIDEO_STREAM, ZERO_LENGTH, TOO_SHORT, CORRUPT)

#: Constant rate factor of :func:`encode_video`: low enough that decoded frames stay within ~1 grey level on average
#: of the input (the x264 default, 23, loses fine texture of 28-pixel items); ``tests/data/test_video_io.py`` bounds it.
DEFAULT_CRF: int = 12
#: One thread, no MB-tree: what makes x264's output a function of its input alone (see :func:`encode_video`).
_X264_PARAMS: str = "threads=1:lookahead-threads=1:mbtree=0"
#: Container format per file suffix (the temporary file of an atomic write has another suffix, so it is explicit).
FORMATS: dict[str, str] = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


class VideoError(ValueError):
    """A clip that cannot be used; ``reason`` is one of :data:`REASONS`, the message names the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown video rejection reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"video {os.fspath(path)}: {reason}: {detail}")
        self.path, self.reason, self.detail = Path(path), reason, detail

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (worker processes send errors back)
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found: decoded frame count, frame rate and frame size of the first video stream."""

    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        """Decoded frames / frame rate (0.0 when the stream declares no rate)."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[Any, Any]]:
    """(container, first video stream) for single-threaded decoding, closed afterwards; open failures -> VideoError."""
    if not path.is_file():
        raise VideoError(path, UNREADABLE, "file not found (or not a regular file)")
    if path.stat().st_size == 0:
        raise VideoError(path, ZERO_LENGTH, "0 bytes")
    try:
        container = av.open(os.fspath(path), mode="r")
    except (av.error.FFmpegError, OSError) as exc:  # FFmpeg's FileNotFoundError / PermissionError are OSErrors too
        raise VideoError(path, UNREADABLE, f"cannot open as a media container ({exc})") from exc
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(path, NO_VIDEO_STREAM, f"the container has no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "SLICE"  # and one thread: no frame threading, no reordering delay
        stream.codec_context.thread_count = 1
        yield container, stream
    finally:
        container.close()


def _frames(path: Path, container: Any, stream: Any) -> Iterator[Any]:
    """The decoded frames of ``stream``; decoder errors and frames the decoder flags as concealed -> ``corrupt``."""
    decoded = 0
    try:
        for frame in container.decode(stream):
            if frame.is_corrupt:
                raise VideoError(path, CORRUPT, f"frame {decoded} decoded with errors (damaged data concealed)")
            decoded += 1
            yield frame
    except av.error.FFmpegError as exc:  # InvalidDataError and the other decoding failures
        raise VideoError(path, CORRUPT, f"decoding failed after {decoded} frame(s) ({exc})") from exc


def _fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike[str], min_frames: int = 1) -> VideoInfo:
    """Decode the first video stream of ``path`` to the end -> :class:`VideoInfo`, or raise :class:`VideoError`:
    ``unreadable`` (missing, not a container), ``no_video_stream``, ``zero_length`` (0 bytes or 0 decoded frames),
    ``corrupt`` (a decoding error or a concealed frame), ``too_short`` (fewer than ``min_frames`` frames)."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        fps = _fps(stream)
        count, width, height = 0, int(stream.codec_context.width), int(stream.codec_context.height)
        for frame in _frames(path, container, stream):
            count, width, height = count + 1, int(frame.width), int(frame.height)
    if count == 0:
        raise VideoError(path, ZERO_LENGTH, "the video stream decodes to 0 frames")
    if count < min_frames:
        raise VideoError(path, TOO_SHORT, f"{count} decoded frame(s), at least {min_frames} needed")
    return VideoInfo(num_frames=count, fps=fps, width=width, height=height)


def decode_frames(path: str | os.PathLike[str], indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of ``path`` -> uint8 (len(indices), H, W, 3) RGB.

    One sequential pass up to ``max(indices)``; each needed frame is converted once and written into the output,
    nothing else is kept. An index past the last frame raises ``VideoError(too_short)``; the other reasons are those
    of :func:`probe_video` (a clip accepted by the probe decodes the same here)."""
    path = Path(path)
    wanted = [int(i) for i in indices]
    if any(i < 0 for i in wanted):
        raise ValueError(f"video {path}: frame indices must be >= 0, got {min(wanted)}")
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(wanted):
        slots.setdefault(index, []).append(slot)
    with _open_video(path) as (container, stream):
        out: np.ndarray | None = None
        if not wanted:
            height, width = int(stream.codec_context.height), int(stream.codec_context.width)
            return np.empty((0, height, width, 3), dtype=np.uint8)
        last, seen = max(wanted), 0
        for index, frame in enumerate(_frames(path, container, stream)):
            seen = index + 1
            if index in slots:
                rgb = frame.to_ndarray(format="rgb24")
                if out is None:
                    out = np.empty((len(wanted), *rgb.shape), dtype=np.uint8)
                elif rgb.shape != out.shape[1:]:
                    raise VideoError(path, CORRUPT, f"frame {index} is {rgb.shape[:2]}, earlier ones {out.shape[1:3]}")
                out[slots[index]] = rgb
            if index == last:
                break
    if out is None or seen <= last:
        raise VideoError(path, TOO_SHORT, f"frame {last} requested, the video stream has {seen} frame(s)")
    return out


def decoded_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of every decoded frame's planes in their native pixel format (yuv420p for :func:`encode_video`).

    H.264 decoding is bit-exact by the standard, unlike the conversion to RGB (swscale's): this digest checks a
    file's content across FFmpeg builds, where the file's own sha256 only checks its bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    with _open_video(path) as (container, stream):
        for frame in _frames(path, container, stream):
            digest.update(f"{frame.format.name} {frame.width}x{frame.height};".encode())
            for plane in frame.planes:  # rows without the line padding
                rows = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
                digest.update(np.ascontiguousarray(rows[: plane.height, : plane.width]).tobytes())
    return digest.hexdigest()


def encode_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: int = 10,
    codec: str = "libx264",
    crf: int = DEFAULT_CRF,
) -> Path:
    """uint8 (T, H, W, 3) RGB -> a video file at ``path`` (H.264 in MP4, yuv420p by default), written atomically.

    The same frames give the same bytes (on one FFmpeg build): one encoder thread, x264's MB-tree off (with it,
    about 2 % of 28 x 28 clips encoded to other bytes on a second run in one process: it reads memory that depends
    on what ran before), no version or wall-clock metadata (``fflags=+bitexact``), the moov atom first
    (``movflags=+faststart``, as streamed MP4s are; a truncated file then fails as ``corrupt`` instead of being
    unopenable). ``crf`` applies to libx264 (see :data:`DEFAULT_CRF`).
    H and W must be even: yuv420p stores chroma at half resolution in both directions.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"encode_video {path}: expected uint8 (T>0, H, W, 3) RGB frames, got {frames.dtype} {frames.shape}"
        )
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if height % 2 or width % 2:
        raise ValueError(
            f"encode_video {path}: frame size {height}x{width} has an odd side; yuv420p (H.264) needs even height "
            "and width: pad or crop the frames by one pixel"
        )
    container_format = FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise ValueError(f"encode_video {path}: unknown container suffix {path.suffix!r}; use one of {sorted(FORMATS)}")
    options = {"crf": str(int(crf)), "preset": "medium", "x264-params": _X264_PARAMS}

    def write(tmp: Path) -> None:
        container_options = {"fflags": "+bitexact"}
        if container_format in ("mp4", "mov"):
            container_options["movflags"] = "+faststart"
        with av.open(os.fspath(tmp), mode="w", format=container_format, options=container_options) as container:
            stream = container.add_stream(codec, rate=int(fps), options=options if codec == "libx264" else {})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            for rgb in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
            container.mux(stream.encode(None))

    return replace_atomically(path, write)
