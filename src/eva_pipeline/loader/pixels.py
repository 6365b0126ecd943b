"""Pixels for manifest rows: resolve each ``location`` to a uint8 image, reading every container only once.

Locations are ``"path"`` (an encoded image file, decoded as RGB by :func:`~eva_pipeline.ingest.decode.decode_image`,
EXIF rotation applied, as at ingestion) or ``"path#member"`` (an item inside a container: IDX, or a webdataset
``.tar`` shard; more through :func:`register_container`). Rows that share a container are
gathered with one read and one fancy index, so the 10k-image demo loads in a fraction of a second.

A streaming loader reads scattered single rows instead (:class:`PixelReader`): a tar member whose data offset and
size are known (the manifest row index of :mod:`eva_pipeline.loader.row_index`) is one seek and one read, like an
image file, whatever the order of the rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from eva_pipeline.ingest.decode import decode_image
from eva_pipeline.ingest.readers.idx import read_idx

log = logging.getLogger(__name__)

#: A container reader: (container path, members of the requested rows) -> uint8 array (n, H, W, C).
ContainerReader = Callable[[Path, list[str]], np.ndarray]
_CONTAINERS: list[tuple[Callable[[Path], bool], ContainerReader]] = []
#: Readers whose items' ``content_hash`` is of the encoded bytes, not of the decoded pixels (not re-checked).
_ENCODED_HASH_READERS: set[ContainerReader] = set()


def register_container(
    matches: Callable[[Path], bool], *, pixel_hashes: bool = True
) -> Callable[[ContainerReader], ContainerReader]:
    """Decorator: use ``reader`` for ``"path#member"`` locations whose path satisfies ``matches`` (checked first).

    ``pixel_hashes``: the container's ``content_hash`` is the sha1 of the item's pixel bytes, which
    ``load_images(verify_hashes=True)`` can check; False when it is of the encoded bytes (then not checked).
    """

    def decorate(reader: ContainerReader) -> ContainerReader:
        _CONTAINERS.insert(0, (matches, reader))
        if not pixel_hashes:
            _ENCODED_HASH_READERS.add(reader)
        return reader

    return decorate


def _is_idx(path: Path) -> bool:
    """IDX is the fallback container: anything not claimed by a more specific reader is tried as IDX."""
    return True


@register_container(_is_idx)
def _read_idx_members(path: Path, members: list[str]) -> np.ndarray:
    """IDX items by integer index -> (n, H, W, C); the file is decompressed once for all members."""
    return _idx_items(path, _checked_idx(path), members)


def _checked_idx(path: Path) -> np.ndarray:
    array = read_idx(path)
    if array.ndim not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"IDX file {path}: expected uint8 images (N, H, W[, C]), got {array.dtype} {array.shape}")
    return array


def _idx_items(path: Path, array: np.ndarray, members: list[str]) -> np.ndarray:
    try:
        index = np.asarray([int(m) for m in members], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"IDX file {path}: member indices must be integers ({exc})") from exc
    if len(index) and (index.min() < 0 or index.max() >= array.shape[0]):
        raise ValueError(f"IDX file {path}: index out of range for {array.shape[0]} images (stale manifest?)")
    items = array[index]
    return items[..., None] if items.ndim == 3 else items


def _is_tar(path: Path) -> bool:
    return path.suffix.lower() == ".tar"


def reads_as_tar(path: Path) -> bool:
    """Whether ``"path#member"`` locations are read as members of a tar shard (the registered reader of ``path``)."""
    return next(r for match, r in _CONTAINERS if match(path)) is _read_tar_members


def _decode_or_raise(data: bytes, name: str) -> np.ndarray:
    image, rejection = decode_image(data, name, min_side=1)  # the size policy is ingestion's, not the loader's
    if rejection is not None:
        raise ValueError(f"{name}: cannot decode ({rejection.reason}: {rejection.detail}); stale manifest?")
    return np.array(image)  # a writable copy: torch.from_numpy warns on read-only


@register_container(_is_tar, pixel_hashes=False)
def _read_tar_members(path: Path, members: list[str]) -> np.ndarray:
    """Members of one webdataset tar shard -> (n, H, W, 3); the shard is read once, stopping after the last one."""
    from eva_pipeline.ingest.readers.webdataset import iter_tar_files

    wanted = set(members)
    found: dict[str, bytes] = {}
    try:
        for item in iter_tar_files(path, select=wanted.__contains__):
            found[item["fname"]] = item["data"]
            if len(found) == len(wanted):
                break
    except FileNotFoundError:
        raise FileNotFoundError(f"shard not found: {path} (stale manifest or wrong working directory?)") from None
    if missing := sorted(wanted - set(found)):
        raise ValueError(f"shard {path}: {len(missing)} member(s) not found, e.g. {missing[:3]} (stale manifest?)")
    pixels = [_decode_or_raise(found[m], f"{path}#{m}") for m in members]
    if len({p.shape for p in pixels}) != 1:
        sizes = sorted({p.shape[:2] for p in pixels})
        raise ValueError(f"load_images needs images of one size to stack them, found sizes (H, W) {sizes} in {path}")
    return np.stack(pixels)


def _read_file(path: Path) -> np.ndarray:
    """One encoded image file -> (H, W, 3) uint8 RGB, decoded exactly as at ingestion."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path} (stale manifest or wrong working directory?)") from None
    return _decode_or_raise(data, str(path))


class PixelReader:
    """Random access to the pixels of single manifest rows, for loaders that stream a few rows at a time.

    ``load_images`` reads each container whole, which suits one pass over a small split. A streaming loader asks
    for a batch of scattered rows at every step instead. A tar member whose ``(data offset, size)`` span is given
    (the manifest row index stores it) is one ``seek`` + ``read`` of its header block and its bytes: the header is
    checked against the span, and a shard rewritten since the index was built falls back to the path below. Other
    containers are cached per process within a bound: decompressed IDX arrays, and tar-shard member indices
    (name -> offset, size; from the tar headers with the standard ``tarfile`` module). Items are decoded exactly as
    at ingestion. Picklable: a copy sent to a DataLoader worker starts with empty caches.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, max_containers: int = 8) -> None:
        self.root = None if root is None else Path(root)
        self.max_containers = max_containers
        self._cache: OrderedDict[tuple[str, int, int], object] = OrderedDict()
        self._stale: set[str] = set()  # shards whose stored spans no longer match (warned once)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "_stale": set()}

    def _resolve(self, path: str) -> Path:
        return self.root / path if self.root is not None and not Path(path).is_absolute() else Path(path)

    def _cached(self, path: Path, build: Callable[[Path], object]) -> object:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"container not found: {path} (stale manifest or wrong working directory?)"
            ) from None
        key = (str(path), st.st_size, st.st_mtime_ns)  # a rewritten file is re-read, never served stale
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = build(path)
        self._cache[key] = value
        while len(self._cache) > self.max_containers:
            self._cache.popitem(last=False)
        return value

    def read(self, locations: Sequence[str], spans: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """The (H, W, C) uint8 pixels of each location, in order (C = 1 for grayscale IDX items, else 3).

        ``spans``: per location, the ``(data offset, size)`` of a tar member, or a negative offset when unknown.
        """
        out: list[np.ndarray | None] = [None] * len(locations)
        groups: dict[str, tuple[list[int], list[str]]] = {}
        for k, location in enumerate(locations):
            path, member = split_location(location)
            if member is None:
                out[k] = _read_file(self._resolve(path))
            elif (
                spans is not None
                and spans[k][0] >= 0
                and ((item := self._read_span(path, member, *spans[k])) is not None)
            ):
                out[k] = item
            else:
                rows, members = groups.setdefault(path, ([], []))
                rows.append(k)
                members.append(member)
        for path, (rows, members) in groups.items():
            container = self._resolve(path)
            reader = next(r for match, r in _CONTAINERS if match(container))
            if reader is _read_idx_members:
                array = self._cached(container, _checked_idx)
                items = _idx_items(container, array, members)
            elif reader is _read_tar_members:
                index = self._cached(container, tar_member_spans)
                items = _read_indexed_tar(container, index, members)
            else:  # a registered container without a random-access path: its batch reader
                items = reader(container, members)
            for k, item in zip(rows, items, strict=True):
                out[k] = item if item.ndim == 3 else item[..., None]
        return out  # type: ignore[return-value]

    def _read_span(self, path: str, member: str, offset: int, size: int) -> np.ndarray | None:
        """Member ``member`` of shard ``path`` read at its stored span; None when the shard no longer matches."""
        shard = self._resolve(path)
        data = read_tar_span(shard, member, int(offset), int(size))
        if data is None:
            if path not in self._stale:
                self._stale.add(path)
                log.warning("shard %s changed since the manifest row index was built: reading it by name", shard)
            return None
        return _decode_or_raise(data, f"{shard}#{member}")


#: Bytes of a tar header block: a member's own header ends right where its data starts.
TAR_BLOCK: int = tarfile.BLOCKSIZE


def read_tar_span(path: Path, member: str, offset: int, size: int) -> bytes | None:
    """The ``size`` data bytes of ``member`` at ``offset`` of tar shard ``path``, with one seek and one read (of
    the member's header block too, which is checked: its size, and its name where the name fits the header);
    None when the header does not match (the shard was rewritten)."""
    if offset < TAR_BLOCK or size < 0:
        return None
    try:
        with path.open("rb") as fh:
            fh.seek(offset - TAR_BLOCK)
            buf = fh.read(TAR_BLOCK + size)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard not found: {path} (stale manifest or wrong working directory?)") from None
    if len(buf) != TAR_BLOCK + size:
        return None
    try:
        header = tarfile.TarInfo.frombuf(buf[:TAR_BLOCK], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return None
    name_fits = member.isascii() and len(member) < tarfile.LENGTH_NAME  # else the real name is in a pax/GNU record
    if header.size != size or (name_fits and header.name != member):
        return None
    return buf[TAR_BLOCK:]


def tar_member_spans(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of a tar shard, from its headers only (data blocks are skipped)."""
    with tarfile.open(path, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def _read_indexed_tar(path: Path, index: dict[str, tuple[int, int]], members: list[str]) -> list[np.ndarray]:
    if missing := [m for m in members if m not in index]:
        raise ValueError(f"shard {path}: {len(missing)} member(s) not found, e.g. {missing[:3]} (stale manifest?)")
    items = []
    with path.open("rb") as fh:
        for member in members:
            offset, size = index[member]
            fh.seek(offset)
            items.append(_decode_or_raise(fh.read(size), f"{path}#{member}"))
    return items


def split_location(location: str) -> tuple[str, str | None]:
    """``"path#member"`` -> (path, member); a location without ``#`` is a plain file -> (path, None)."""
    path, sep, member = location.rpartition("#")
    return (path, member) if sep and path else (location, None)


def load_images(
    manifest: pd.DataFrame, root: str | os.PathLike[str] | None = None, *, verify_hashes: bool = False
) -> torch.Tensor:
    """All rows of ``manifest`` as one uint8 tensor (N, C, H, W), in manifest order.

    Relative locations are resolved against ``root`` (default: the working directory, i.e. the project root
    under Kedro). C is 1 when every item is grayscale, else 3 (grayscale replicated). All items must share one
    size, as a stacked batch needs. Each item's size is checked against the manifest's width/height, and with
    ``verify_hashes`` its bytes against ``content_hash``, which catches a manifest that no longer matches its files.
    """
    n = len(manifest)
    locations = manifest["location"].tolist()
    base = Path(root) if root is not None else None

    def resolve(location: str) -> Path:
        return (base / location) if base is not None and not Path(location).is_absolute() else Path(location)

    groups: dict[str, tuple[list[int], list[str]]] = {}
    files: list[tuple[int, str]] = []
    for row, location in enumerate(locations):
        path, member = split_location(location)
        if member is None:
            files.append((row, path))
        else:
            rows, members = groups.setdefault(path, ([], []))
            rows.append(row)
            members.append(member)

    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (row indices, (n, H, W, C) pixels)
    unhashed: set[int] = set()  # rows whose content_hash is of encoded bytes: not comparable with pixels
    for path, (rows, members) in groups.items():
        container = resolve(path)
        reader = next(r for match, r in _CONTAINERS if match(container))
        parts.append((np.asarray(rows), reader(container, members)))
        if reader in _ENCODED_HASH_READERS:
            unhashed.update(rows)
    for row, path in files:
        parts.append((np.asarray([row]), _read_file(resolve(path))[None]))
    if n == 0:
        return torch.empty((0, 1, 0, 0), dtype=torch.uint8)

    shapes = {p.shape[1:3] for _, p in parts}
    if len(shapes) != 1:
        raise ValueError(f"load_images needs images of one size to stack them, found sizes (H, W) {sorted(shapes)}")
    (height, width), channels = shapes.pop(), max(p.shape[3] for _, p in parts)
    _check_sizes(manifest, height, width)
    out = torch.empty((n, channels, height, width), dtype=torch.uint8)
    verify = verify_hashes and "content_hash" in manifest.columns
    ids, hashes = (manifest["id"].tolist(), manifest["content_hash"].tolist()) if verify else ([], [])
    for rows, pixels in parts:
        if verify:
            _check_hashes(ids, locations, hashes, rows, pixels, unhashed)
        # (n, H, W, C) -> (n, C, H, W); a grayscale item broadcasts over 3 channels when the batch is mixed.
        out[torch.from_numpy(rows)] = (
            torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).expand(-1, channels, -1, -1)
        )
    return out


def _check_sizes(manifest: pd.DataFrame, height: int, width: int) -> None:
    bad = (manifest["height"].to_numpy() != height) | (manifest["width"].to_numpy() != width)
    if bad.any():
        first = manifest.loc[bad, "id"].iloc[0]
        raise ValueError(
            f"{int(bad.sum())} manifest row(s) disagree with the image size {height}x{width} on disk, e.g. {first!r}: "
            "the manifest is stale, re-run the ingestion pipeline"
        )


def _check_hashes(
    ids: list[str], locations: list[str], hashes: list, rows: np.ndarray, pixels: np.ndarray, unhashed: set[int]
) -> None:
    """Only items of pixel-hashed containers are checked here (a file's or a shard member's hash is of its
    encoding, not of the decoded pixels)."""
    for row, item in zip(rows.tolist(), pixels, strict=True):
        expected = hashes[row]
        if expected is None or pd.isna(expected) or split_location(locations[row])[1] is None or row in unhashed:
            continue
        if hashlib.sha1(np.ascontiguousarray(item)).hexdigest() != expected:
            raise ValueError(
                f"content of {ids[row]!r} ({locations[row]}) does not match its content_hash: the source changed "
                "since ingestion, re-run the ingestion pipeline"
            )


# -------------------------------------------------------------------------------------------------- samples
class ManifestPixels:
    """Pixels of sample indices: manifest rows (a :class:`RowSource`) decoded by a :class:`PixelReader`."""

    def __init__(self, rows: Any, root: str | Path | None = None) -> None:
        self.rows, self.reader = rows, PixelReader(root)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        frame = self.rows.rows(indices)
        spans = None
        if "member_offset" in frame.columns:  # tar members located by the row index: one seek each
            spans = list(zip(frame["member_offset"].tolist(), frame["member_size"].tolist(), strict=True))
        pixels = self.reader.read(frame["location"].tolist(), spans)
        return [torch.from_numpy(a).permute(2, 0, 1) for a in pixels]


class TensorPixels:
    """Pixels of sample indices from images already in memory (uint8 (N, C, H, W)): tests and tiny data."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        return list(self.images[torch.as_tensor(np.asarray(indices))])
