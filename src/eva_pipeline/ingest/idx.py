"""Reading and writing IDX files (the MNIST / Fashion-MNIST container), gzip-compressed or plain.

The embedded demo data is stored in this format, so every failure mode (missing file, broken gzip, wrong magic,
short payload) gets a message that names the file and says what is wrong instead of a NumPy reshape error.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

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
