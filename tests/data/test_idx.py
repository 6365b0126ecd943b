"""IDX reading: the embedded files, round trips, and clear errors for every kind of damage."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from eva_pipeline.ingest.readers.idx import read_idx, write_idx


def test_embedded_files_shapes_and_known_labels(fmnist) -> None:
    train, train_labels = read_idx(fmnist.train_images), read_idx(fmnist.train_labels)
    test, test_labels = read_idx(fmnist.test_images), read_idx(fmnist.test_labels)
    assert train.shape == (10000, 28, 28) and train.dtype == np.uint8
    assert train_labels.shape == (10000,) and test.shape == (5000, 28, 28) and test_labels.shape == (5000,)
    # Published first labels of Fashion-MNIST train / test: the files are the real data, in order.
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert set(np.unique(train_labels)) == set(range(10)) and set(np.unique(test_labels)) == set(range(10))
    assert train.min() == 0 and train.max() == 255 and 60 < train.mean() < 90  # Fashion-MNIST mean is ~72.9


def test_reads_hand_made_header(tmp_path) -> None:
    """Bytes written by hand per the format (not by write_idx): big-endian int16, 2 x 3."""
    values = np.array([[1, -2, 300], [4, 5, -32768]], dtype=np.int16)
    raw = bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 2, 3) + values.astype(">i2").tobytes()
    (tmp_path / "a.idx").write_bytes(raw)
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(raw))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.int16 and out.dtype.isnative and np.array_equal(out, values)


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 255], dtype=np.uint8),
        np.array([[1.5, -2.25], [3e9, 0.0]], dtype=np.float32),
        np.array([-1, 2**31 - 1], dtype=np.int32),
        np.zeros((0, 5), dtype=np.uint8),
    ],
)
def test_round_trip(tmp_path, name, array) -> None:
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.shape == array.shape and out.dtype == array.dtype and np.array_equal(out, array)


def test_gzip_detected_by_content_not_suffix(tmp_path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    plain = write_idx(tmp_path / "a.idx", array)
    (tmp_path / "misnamed.gz").write_bytes(plain.read_bytes())
    (tmp_path / "misnamed").write_bytes(gzip.compress(plain.read_bytes()))
    assert np.array_equal(read_idx(tmp_path / "misnamed.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "misnamed"), array)


def test_missing_file_names_path_and_embedded_location(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.idx.*data/01_raw/fashion_mnist"):
        read_idx(tmp_path / "nope.idx")


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], r"payload truncated: dims \(2, 3, 3\) of uint8 need 18 bytes, found 17"),
        (lambda b: b + b"\x00", r"trailing bytes"),
        (lambda b: b"\x12\x34" + b[2:], r"bad magic number 1234"),
        (lambda b: b[:2] + b"\x07" + b[3:], r"bad magic number 00000703"),  # unknown type code
        (lambda b: b[:3] + b"\x00" + b[4:], r"0 dimensions"),
        (lambda b: b[:9], r"header truncated"),
        (lambda b: b[:3], r"too short"),
    ],
)
def test_damaged_files_give_clear_errors(tmp_path, mutate, message) -> None:
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(mutate(_idx_bytes(np.ones((2, 3, 3), dtype=np.uint8))))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "bad-images-idx3-ubyte" in str(info.value)


def test_truncated_and_corrupt_gzip(tmp_path, fmnist) -> None:
    data = fmnist.train_labels.read_bytes()
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flip\.gz"):
        read_idx(tmp_path / "flip.gz")


def test_write_idx_rejects_unsupported_dtype(tmp_path) -> None:
    with pytest.raises(ValueError, match="no IDX type code"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))
