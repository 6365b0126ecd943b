"""Rebuild the embedded Fashion-MNIST subset shipped in data/01_raw/fashion_mnist/ (provenance record).

Source: Debian's `dataset-fashion-mnist` package (Zalando Research, MIT/Expat licence), IDX files in
/usr/share/datasets/fashion-mnist/. The first N images of each split are kept, byte for byte, in the same IDX
format, gzip-compressed reproducibly (mtime 0). Run: `python scripts/make_embedded_fashion_mnist.py`.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

SOURCE = Path("/usr/share/datasets/fashion-mnist")
TARGET = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "fashion_mnist"
KEEP = {"train": 10_000, "t10k": 5_000}


def _subset(src: Path, dst: Path, count: int) -> None:
    raw = gzip.decompress(src.read_bytes())
    magic, n = struct.unpack(">II", raw[:8])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    header = 4 + 4 * ndim
    item = 1
    for d in dims[1:]:
        item *= d
    if count > n:
        raise ValueError(f"{src} holds {n} items, asked for {count}")
    body = raw[header : header + count * item]
    new_header = struct.pack(">I", magic) + struct.pack(">" + "I" * ndim, count, *dims[1:])
    with open(dst, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(new_header + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    TARGET.mkdir(parents=True, exist_ok=True)
    for split, count in KEEP.items():
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            _subset(args.source / name, TARGET / name, count)
            print(f"wrote {TARGET / name} ({count} items)")


if __name__ == "__main__":
    main()
