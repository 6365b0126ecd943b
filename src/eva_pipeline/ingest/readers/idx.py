"""The ``idx`` source kind: IDX files (the MNIST / Fashion-MNIST container), gzip-compressed or plain.

One concept, the IDX container, in one file: reading, parsing and writing it (:func:`read_idx`, also used by the
loader to decode ``"path#i"`` locations, and :func:`write_idx` for fixtures and converted sources), and the reader
that turns an images file (N, H, W[, C]) uint8 and an optional labels file (N,) into items ``"path#i"``.

The embedded demo data is stored in this format, so every failure mode (missing file, broken gzip, wrong magic,
short payload) gets a message that names the file and says what is wrong instead of a NumPy reshape error.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from eva_pipeline.ingest.scan import SourceScan, SourceSpec, register_source_kind
from eva_pipeline.ingest.scan_cache import UnitCache

#: Where the embedded demo data lies, relative to the project root (mentioned when a file is missing).
EMBEDDED_DATA_DIR: str = "data/01_raw/fashion_mnist"

_GZIP_MAGIC = b"\x1f\x8b"
#: IDX type codes -> big-endian NumPy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES: dict[str, int] = {dt.str.lstrip("<>|="): code for code, dt in _IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """Whole file, decompressed when it starts with the gzip magic (the name's suffix is not trusted)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"IDX file not found: {path} (the embedded Fashion-MNIST demo data lives in {EMBEDDED_DATA_DIR}/ "
            "under the project root; check the source paths in the ingestion parameters)"
        )
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; truncation is an EOFError
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip stream ({exc})") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array of the declared shape and native-endian dtype; ``name`` goes into errors."""
    if len(data) < 4:
        raise ValueError(f"IDX file {name}: only {len(data)} bytes, too short for the 4-byte magic number")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {name}: bad magic number {data[:4].hex()} (expected 0000 + type code in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} + number of dimensions); not an IDX file?"
        )
    if ndim == 0:
        raise ValueError(f"IDX file {name}: declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"IDX file {name}: header truncated ({len(data)} bytes, {ndim} dimensions need {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(
            f"IDX file {name}: payload {what}: dims {dims} of {dtype.name} need {expected} bytes, found {payload}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order so torch.from_numpy and arithmetic work; uint8 (the common case) stays a zero-copy view.
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a gzip or plain IDX file into a read-only array of its declared shape (e.g. (N, 28, 28) uint8).

    Raises FileNotFoundError for a missing file and ValueError naming the file for any malformed content.
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as IDX (gzip when the name ends in ``.gz``); used to build fixtures and converted sources."""
    path = Path(path)
    array = np.asarray(array)
    code = _DTYPE_CODES.get(array.dtype.str.lstrip("<>|="))
    if code is None:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX type code (supported: {sorted(_DTYPE_CODES)})")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: IDX needs 1..255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: byte-identical output for identical arrays
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------- the reader
def _as_location_path(path: str | os.PathLike[str]) -> str:
    return Path(path).as_posix()


@register_source_kind("idx")
def read_idx_source(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """IDX images (N, H, W) or (N, H, W, C) uint8, optional IDX labels (N,); item ``i`` -> ``"path#i"``.
    The images + labels pair is one cache unit."""
    scan = SourceScan(available=0)
    if units is None:
        scan.available = _scan_idx(spec, scan)
        return scan
    paths = [spec.images] + ([] if spec.labels is None else [spec.labels])
    meta = units.run(scan, _as_location_path(spec.images), paths, lambda sub: {"available": _scan_idx(spec, sub)})
    scan.available = meta["available"]
    return scan


def _scan_idx(spec: SourceSpec, scan: Any) -> int:
    """Add the items of an IDX source to ``scan`` (everything is checked before the first one); -> available."""
    images = read_idx(spec.images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(
            f"IDX images {spec.images}: expected uint8 of shape (N, H, W) or (N, H, W, 1|3), "
            f"got {images.dtype} {images.shape}"
        )
    available = int(images.shape[0])
    n = available if spec.limit is None else min(available, int(spec.limit))
    labels: list[int | None] = [None] * n
    if spec.labels is not None:
        raw = read_idx(spec.labels)
        if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"IDX labels {spec.labels}: expected a 1-D integer array, got {raw.dtype} {raw.shape}")
        if raw.shape[0] != available:
            raise ValueError(f"IDX labels {spec.labels}: {raw.shape[0]} labels for {available} images in {spec.images}")
        labels = raw[:n].tolist()
    height, width = int(images.shape[1]), int(images.shape[2])
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    size = height * width * channels
    base = _as_location_path(spec.images)
    for i in range(n):  # C-contiguous rows: hashed without copies
        scan.add(f"{base}#{i}", labels[i], width, height, size, hashlib.sha1(images[i]).hexdigest())
    return available
