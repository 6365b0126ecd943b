"""Rebuild the embedded Animal-MNIST silhouettes shipped in data/01_raw/animal_mnist/ (provenance record).

Source: the wheel of the PyPI package `animal-mnist==0.4` (MIT licence, (c) 2025 SinaSR-6), fetched without its
dependencies (the package pulls tensorflow; it is never installed or imported): `pip download animal-mnist==0.4
--no-deps`. Its two data files `animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz` are gzip-compressed
pickles of one NumPy array each: uint8 (10000, 28, 28) white-on-black silhouettes and int64 (10000,) labels 0-9,
sorted by class, 1,000 per class. They are read straight from the zip (nothing is extracted) by a restricted
unpickler that resolves only the three globals NumPy's ndarray pickle needs (`_reconstruct`, `ndarray`, `dtype`) and
refuses every other one, so no pickled callable can run; the result must be a plain non-object ndarray.

Selection: all 10,000 images (the wheel has no test split), pixels unchanged (already 28x28 uint8, no resize),
reordered class-interleaved so that every prefix is balanced: embedded image j is the wheel's (j mod 10)-th class's
(j div 10)-th image, i.e. wheel index 1000 * (j mod 10) + j div 10. Written as IDX (the `idx` source kind's format,
labels as uint8), gzip with mtime 0 (byte-identical on re-runs), with the wheel's LICENSE file copied byte for byte.
Run: `python scripts/make_embedded_animal_mnist.py path/to/animal_mnist-0.4-py3-none-any.whl`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from eva_pipeline.ingest.readers.idx import write_idx

TARGET = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "animal_mnist"
WHEEL_NAME = "animal_mnist-0.4-py3-none-any.whl"
WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
IMAGES_MEMBER = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABELS_MEMBER = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
LICENSE_MEMBER = "animal_mnist-0.4.dist-info/licenses/LICENSE"
#: SHA-256 of the wheel's members as stored (the same digests as the wheel's RECORD, in hex).
MEMBER_SHA256 = {
    IMAGES_MEMBER: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    LABELS_MEMBER: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    LICENSE_MEMBER: "f544c0d8f978b587f6a611f62f3dd13b6af1a9f891c306c2b052e05320bdfbff",
}
#: Label order of the wheel (its METADATA lists the classes alphabetically; checked by eye on the images).
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
OUTPUTS = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "LICENSE")

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's ndarray-pickle constructor, whatever its module path
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 1.x pickles
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 2.x pickles
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can build NumPy arrays and nothing else: every other global is refused."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only NumPy arrays are unpickled") from None


def load_array(data: bytes, name: str) -> np.ndarray:
    """One plain (non-object) ndarray from pickle bytes, through :class:`NumpyArrayUnpickler`."""
    array = NumpyArrayUnpickler(io.BytesIO(data)).load()
    if type(array) is not np.ndarray or array.dtype.hasobject:
        raise ValueError(f"{name}: expected a plain NumPy array, got {type(array).__name__}")
    return array


def _member(wheel: zipfile.ZipFile, name: str, expected: dict[str, str] | None) -> bytes:
    data = wheel.read(name)
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected[name]:
        raise ValueError(f"{name}: sha256 {digest}, expected {expected[name]} (not the animal-mnist 0.4 wheel?)")
    return data


def read_wheel(path: Path, expected: dict[str, str] | None = MEMBER_SHA256) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(images uint8 (N, 28, 28), labels int (N,), licence text) from the wheel; member digests checked."""
    with zipfile.ZipFile(path) as wheel:
        images = load_array(gzip.decompress(_member(wheel, IMAGES_MEMBER, expected)), IMAGES_MEMBER)
        labels = load_array(gzip.decompress(_member(wheel, LABELS_MEMBER, expected)), LABELS_MEMBER)
        licence = _member(wheel, LICENSE_MEMBER, expected)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{IMAGES_MEMBER}: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{LABELS_MEMBER}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{LABELS_MEMBER}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels, licence


def interleave(labels: np.ndarray) -> np.ndarray:
    """Class-interleaved order: sorted by rank within the class (stable), then by label: the k-th image of each class
    in label order, then the (k+1)-th; every prefix is as balanced as the class sizes allow."""
    rank = np.empty(labels.shape[0], dtype=np.int64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rank[where] = np.arange(where.size)
    return np.lexsort((labels, rank))


def build(wheel: Path, target: Path, expected: dict[str, str] | None = MEMBER_SHA256) -> dict[str, Path]:
    """Write the embedded files into ``target``; returns them by name."""
    images, labels, licence = read_wheel(wheel, expected)
    order = interleave(labels)
    target.mkdir(parents=True, exist_ok=True)
    written = {
        OUTPUTS[0]: write_idx(target / OUTPUTS[0], images[order]),
        OUTPUTS[1]: write_idx(target / OUTPUTS[1], labels[order].astype(np.uint8)),
    }
    (target / OUTPUTS[2]).write_bytes(licence)
    written[OUTPUTS[2]] = target / OUTPUTS[2]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help=f"path to {WHEEL_NAME}")
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args()
    digest = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{args.wheel}: sha256 {digest}, expected {WHEEL_SHA256} ({WHEEL_NAME})")
    for name, path in build(args.wheel, args.target).items():
        print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}")


if __name__ == "__main__":
    main()
