"""Rebuild the embedded Fashion-MNIST subset shipped in data/01_raw/fashion_mnist/ (provenance record).

Source: Debian's `dataset-fashion-mnist` package (Zalando Research, MIT/Expat licence), IDX files in
/usr/share/datasets/fashion-mnist/ (`apt-get install dataset-fashion-mnist`, or `apt-get download` it and
`dpkg -x` the .deb and pass `--source <dir>/usr/share/datasets/fashion-mnist`). Contiguous slices of each split are
kept, byte for byte, in the same IDX format, gzip-compressed reproducibly (mtime 0): the first 10,000 training images
(pre-training pool), the first 5,000 test images (held-out probe split) and the next 2,000 test images, 5,000-6,999
(`t10k-fresh-*`: a fresh test set from the same distribution, disjoint from the other two; the ImageNet-V2 idea).
Run: `python scripts/make_embedded_fashion_mnist.py [--source DIR]`.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

SOURCE = Path("/usr/share/datasets/fashion-mnist")
TARGET = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "fashion_mnist"
#: (source split, first index, end index, output prefix): image i of the output is image first + i of the source.
SUBSETS = (
    ("train", 0, 10_000, "train"),
    ("t10k", 0, 5_000, "t10k"),
    ("t10k", 5_000, 7_000, "t10k-fresh"),
)
#: Label order (the upstream README's table).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _subset(src: Path, dst: Path, start: int, stop: int) -> None:
    raw = gzip.decompress(src.read_bytes())
    magic, n = struct.unpack(">II", raw[:8])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    header = 4 + 4 * ndim
    item = 1
    for d in dims[1:]:
        item *= d
    if not 0 <= start < stop <= n:
        raise ValueError(f"{src} holds {n} items, asked for {start}..{stop - 1}")
    body = raw[header + start * item : header + stop * item]
    new_header = struct.pack(">I", magic) + struct.pack(">" + "I" * ndim, stop - start, *dims[1:])
    with open(dst, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(new_header + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    for split, start, stop, prefix in SUBSETS:
        for kind in ("images-idx3", "labels-idx1"):
            dst = args.target / f"{prefix}-{kind}-ubyte.gz"
            _subset(args.source / f"{split}-{kind}-ubyte.gz", dst, start, stop)
            print(f"wrote {dst} ({split} items {start}..{stop - 1})")


if __name__ == "__main__":
    main()
