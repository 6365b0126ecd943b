"""Source readers for encoded images: ``image_folder``, ``file_list`` and ``webdataset`` (registered on import).

Every candidate item is read once, hashed (sha1 of the raw file bytes: ``content_hash``) and fully decoded with
:func:`~eva_pipeline.ingest.decode.decode_image`, so the manifest's width/height are those after EXIF rotation and
an unreadable item becomes a rejection with a reason in the ingestion report; nothing is dropped silently and
nothing is substituted. ``limit`` keeps the first ``limit`` candidates (in sorted order); the rest are counted
in ``available`` without being read (webdataset: reading stops, see ``available_is_lower_bound``).

Locations: a file is its path (the source's folder or the list file's folder joined with the relative path,
so relative sources give relative locations); a webdataset item is ``"shard.tar#member"``. A ``#`` inside a
file path or member name would make the location ambiguous, so such items are rejected (``unsupported path``).

Incremental scans: given a :class:`~eva_pipeline.ingest.scan_cache.UnitCache` (``units``), each image file and each
shard is one cache unit; an unchanged one is replayed from the cache without being opened.

Parallel decode: with ``decode_workers > 1`` a :class:`UnitRunner` reads and decodes the next uncached files (or
shards) in a thread pool (Pillow's decoders and hashlib release the GIL) while results are recorded strictly in
scan order, so the manifest, the report and the cache are identical to a single-threaded scan.

Memory: readers stream items into the :class:`~eva_pipeline.ingest.scan.SourceScan` (which spills to disk) and
hold at most one directory listing per tree level, one shard sample, or (file lists) one chunk of seen lines.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from eva_pipeline.ingest.decode import IMAGE_EXTENSIONS, decode_image, is_image_name
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, StringSet, register_source_kind
from eva_pipeline.ingest.scan_cache import KEEP_LABEL, UnitCache

MISSING = "missing file"
UNREADABLE = "unreadable file"
UNSUPPORTED_PATH = "unsupported path"
OUTSIDE_CLASSES = "outside class folders"
BAD_LINE = "bad line"
REPEATED = "repeated entry"
NO_IMAGE = "no image in sample"
BAD_LABEL = "bad label"
CORRUPT_SHARD = "corrupt shard"

#: How many ignored (non-image) file names an image_folder report lists.
_IGNORED_EXAMPLES = 20
#: Preference among image members of one webdataset sample (first present wins).
_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def _posix(path: str) -> str:
    return path if os.sep == "/" else Path(path).as_posix()


def _ingest(scan: SourceScan, location: str, label: int | None, data: bytes, name: str) -> None:
    """Decode ``data`` and record the item as accepted or rejected."""
    image, rejection = decode_image(data, name)
    if rejection is not None:
        scan.reject(location, rejection.reason, rejection.detail)
        return
    assert image is not None
    scan.add(location, label, image.width, image.height, len(data), hashlib.sha1(data).hexdigest())


def _ingest_file(scan: SourceScan, location: str, label: int | None) -> None:
    """Read one image file (missing or unreadable -> a rejection) and ingest it."""
    if "#" in location:
        scan.reject(location, UNSUPPORTED_PATH, "'#' is reserved for container members in manifest locations")
        return
    try:
        with open(location, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        scan.reject(location, MISSING, str(exc))
        return
    except OSError as exc:
        scan.reject(location, UNREADABLE, f"{type(exc).__name__}: {exc}")
        return
    _ingest(scan, location, label, data, location)


class _Recorded:
    """A unit's ``add`` / ``reject`` calls made in a worker thread, replayed into the real sink in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, tuple[Any, ...]]] = []
        self.meta: dict[str, Any] | None = None

    def add(self, *args: Any) -> None:
        self.calls.append((True, args))

    def reject(self, *args: Any) -> None:
        self.calls.append((False, args))

    def replay(self, sink: Any) -> dict[str, Any] | None:
        for accepted, args in self.calls:
            (sink.add if accepted else sink.reject)(*args)
        return self.meta


def _record(read: Callable[[Any], dict[str, Any] | None]) -> _Recorded:
    recorded = _Recorded()
    recorded.meta = read(recorded)
    return recorded


class _Labelled:
    """Sink that sets the label of every accepted item (what ``UnitCache.run(label=...)`` does with a cache)."""

    def __init__(self, scan: SourceScan, label: int | None) -> None:
        self.scan, self.label = scan, label

    def add(self, location: str, label: Any, *rest: Any) -> None:
        self.scan.add(location, self.label, *rest)

    def reject(self, *args: Any) -> None:
        self.scan.reject(*args)


class UnitRunner:
    """Runs a reader's units (files, shards) and in-between actions strictly in order, reading up to
    ``4 * workers`` uncached units ahead in a thread pool; ``workers == 1`` runs everything inline."""

    def __init__(self, scan: SourceScan, units: UnitCache | None, workers: int = 1) -> None:
        self.scan, self.units = scan, units
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest-decode") if workers > 1 else None
        self.ahead = 4 * workers if workers > 1 else 0
        self.queue: deque[tuple[Callable[[], None], Future | None]] = deque()

    def __enter__(self) -> UnitRunner:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def direct(self, action: Callable[[SourceScan], None]) -> None:
        """``action(scan)`` in its place in the order (e.g. a rejection found while listing)."""
        self._push(lambda: action(self.scan), None)

    def unit(
        self,
        unit: str,
        paths: list[Any],
        read: Callable[[Any], dict[str, Any] | None],
        *,
        label: Any = KEEP_LABEL,
        reusable: Callable[[dict[str, Any]], bool] | None = None,
        done: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """One unit: ``read(sink)`` ahead in a thread unless the cache holds it; recorded in order."""
        future = None
        if self.pool is not None and (self.units is None or not self.units.is_cached(unit, paths, reusable)):
            future = self.pool.submit(_record, read)

        def run() -> None:
            reader = read if future is None else (lambda sink: future.result().replay(sink))
            if self.units is None:
                meta = reader(self.scan if label is KEEP_LABEL else _Labelled(self.scan, label)) or {}
            else:
                meta = self.units.run(self.scan, unit, paths, reader, label=label, reusable=reusable)
            if done is not None:
                done(meta)

        self._push(run, future)

    def _push(self, run: Callable[[], None], future: Future | None) -> None:
        self.queue.append((run, future))
        while len(self.queue) > self.ahead:
            self.queue.popleft()[0]()

    def finish(self) -> None:
        while self.queue:
            self.queue.popleft()[0]()


def _file_unit(runner: UnitRunner, location: str, label: int | None) -> None:
    """One image file as one unit (its cached result is stored without the label, which comes from the folder or
    the list line)."""
    if "#" in location:  # rejected without reading; not a cache unit
        runner.direct(lambda scan: _ingest_file(scan, location, label))
    else:
        runner.unit(location, [location], lambda sink: _ingest_file(sink, location, None), label=label)


def _no_labels_file(spec: SourceSpec) -> None:
    if spec.labels is not None:
        raise ValueError(f"a {spec.kind} source takes no labels file (got {spec.labels})")


# ---------------------------------------------------------------------------------------------------- image_folder
def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    """Visible entries of one directory, sorted by name (hidden ``.*`` entries are skipped)."""
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk_files(path: str) -> Iterator[os.DirEntry[str]]:
    """Every file under ``path``, depth first in sorted order; one directory listing held per level."""
    for entry in _sorted_entries(path):
        if entry.is_dir():
            yield from _walk_files(entry.path)
        else:
            yield entry


def _has_image_file(path: str) -> bool:
    with os.scandir(path) as it:
        return any(e.is_file() and is_image_name(e.name) for e in it)


def detect_folder_layout(root: str | os.PathLike[str]) -> str:
    """``"class_folders"`` when no image lies directly in ``root`` and an immediate subdirectory holds images
    (ImageNet-21K), else ``"flat"`` (COCO, Objects365, ADE20K image folders).

    Pass the folder that really holds the images (e.g. ``train2017/``): a parent of several split folders would
    look like class folders; ``layout="flat"`` overrides the guess.
    """
    root = os.fspath(root)
    if _has_image_file(root):
        return "flat"
    subdirs = [e.path for e in _sorted_entries(root) if e.is_dir()]
    return "class_folders" if any(_has_image_file(d) for d in subdirs) else "flat"


@register_source_kind("image_folder")
def read_image_folder(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """A directory tree of image files. Class folders: label = index of the immediate subdirectory in sorted
    order (every visible subdirectory is a class, as torchvision's ImageFolder), names in ``info["classes"]``;
    an image directly under the root is then rejected. Flat: every image in the tree, unlabelled."""
    _no_labels_file(spec)
    root = _posix(os.fspath(spec.images))
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    layout = detect_folder_layout(root) if spec.layout == "auto" else spec.layout
    scan = SourceScan(available=0)
    classes: dict[str, int] = {}
    if layout == "class_folders":
        classes = {name: i for i, name in enumerate(e.name for e in _sorted_entries(root) if e.is_dir())}
    limit = spec.limit
    candidates = 0
    ignored: list[str] = []
    n_ignored = 0
    prefix = len(root.rstrip("/")) + 1
    with UnitRunner(scan, units, spec.decode_workers) as runner:
        for entry in _walk_files(root):
            location = _posix(entry.path)
            if not is_image_name(entry.name):
                n_ignored += 1
                if len(ignored) < _IGNORED_EXAMPLES:
                    ignored.append(location)
                continue
            candidates += 1
            if limit is not None and candidates > limit:
                continue  # counted in `available`, not read
            label = None
            if layout == "class_folders":
                top, sep, _ = location[prefix:].partition("/")
                if not sep:
                    runner.direct(
                        lambda scan, location=location: scan.reject(
                            location, OUTSIDE_CLASSES, "an image directly under the root of a class-folder tree"
                        )
                    )
                    continue
                label = classes[top]
            _file_unit(runner, location, label)
    scan.available = candidates
    scan.info.update({"layout": layout, "ignored_files": n_ignored, "ignored_examples": ignored})
    if layout == "class_folders":
        scan.info["classes"] = list(classes)
    return scan


# ---------------------------------------------------------------------------------------------------- file_list
def parse_list_line(line: str) -> tuple[str, int | None]:
    """``"path"``, ``"path<TAB>label"`` or ``"path label"`` -> (path, label); raises ValueError on a bad label.

    With a TAB the path may contain spaces and the field after the last TAB must be an integer label; without
    one, a trailing whitespace-separated integer is the label (so ``"my photo.jpg"`` is a path without label).
    """
    if "\t" in line:
        path, _, label = line.rpartition("\t")
        path, label = path.strip(), label.strip()
        if not path:
            raise ValueError("no path before the TAB")
        try:
            return path, int(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not an integer") from None
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            return parts[0], int(parts[1])
        except ValueError:
            pass
    return line, None


@register_source_kind("file_list")
def read_file_list(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """A UTF-8 text file, one ``path[<TAB or space>label]`` per line; relative paths are resolved against the
    list file's folder; blank lines and ``#`` comment lines are skipped; a missing file is a rejection."""
    _no_labels_file(spec)
    list_path = Path(spec.images)
    base = list_path.parent
    scan = SourceScan(available=0)
    seen = StringSet()  # in memory up to one chunk of lines, then on disk
    candidates = 0
    try:
        with (
            list_path.open(encoding="utf-8", errors="replace") as fh,
            UnitRunner(scan, units, spec.decode_workers) as runner,
        ):
            for lineno, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                candidates += 1
                if spec.limit is not None and candidates > spec.limit:
                    continue
                try:
                    path, label = parse_list_line(line)
                except ValueError as exc:
                    at, detail = f"{list_path.as_posix()}:{lineno}", f"{exc}: {line!r}"
                    runner.direct(lambda scan, at=at, d=detail: scan.reject(at, BAD_LINE, d))
                    continue
                location = path if os.path.isabs(path) else (base / path).as_posix()
                if not seen.add(location):
                    runner.direct(
                        lambda scan, loc=location, n=lineno: scan.reject(
                            loc, REPEATED, f"line {n} repeats an earlier line of {list_path}"
                        )
                    )
                    continue
                _file_unit(runner, location, label)
    finally:
        seen.close()
    scan.available = candidates
    return scan


# ---------------------------------------------------------------------------------------------------- webdataset
def webdataset_shards(path: str | os.PathLike[str]) -> list[Path]:
    """A single ``.tar`` file, or the ``*.tar`` files of a folder in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")


def iter_tar_files(shard: Path, select: Any = None, errors: list[Exception] | None = None) -> Iterator[dict[str, Any]]:
    """The regular members of one tar shard as ``{"fname", "data", "__url__"}`` dicts, via webdataset.

    With ``errors`` a damaged shard ends the iteration normally and the exception is appended there, so that a
    grouping stage downstream still flushes the samples read before the damage; without it, it is raised.
    """
    from webdataset.tariterators import tar_file_iterator

    with shard.open("rb") as fh:
        try:
            for item in tar_file_iterator(fh, select_files=select):
                item["__url__"] = shard.as_posix()
                yield item
        except Exception as exc:
            if errors is None:
                raise
            errors.append(exc)


def _image_member(sample: dict[str, Any]) -> str | None:
    """The image extension of one sample (the first of :data:`_WDS_IMAGE_ORDER` present, any case)."""
    exts = {k.lower(): k for k in sample if not k.startswith("__")}
    for ext in _WDS_IMAGE_ORDER:
        if ext in exts:
            return exts[ext]
    for lower, ext in exts.items():  # e.g. "seg.png": a multi-part extension ending with an image one
        if f".{lower.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS:
            return ext
    return None


@register_source_kind("webdataset")
def read_webdataset(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """img2dataset-style shards: members ``<key>.jpg|png|webp`` (+ optional ``.txt``/``.json``/``.cls``) grouped
    into samples with webdataset; label from ``.cls`` when present. A shard that cannot be read to its end is
    one ``corrupt shard`` rejection (the samples before the damage are kept)."""
    _no_labels_file(spec)
    shards = webdataset_shards(spec.images)
    if not shards:
        raise ValueError(f"no .tar shards in {spec.images}")
    if bad := [s.as_posix() for s in shards if "#" in s.as_posix()]:
        raise ValueError(f"shard paths must not contain '#': {bad}")
    scan = SourceScan(available=0)
    state = {"candidates": 0, "stopped": False}

    def done(meta: dict[str, Any]) -> None:
        state["candidates"] += meta["samples"]
        state["stopped"] = state["stopped"] or meta["stopped"]

    # With a limit, how much of a shard to read depends on the shards before it: read them one at a time.
    workers = spec.decode_workers if spec.limit is None else 1
    with UnitRunner(scan, units, workers) as runner:
        for shard in shards:
            if state["stopped"]:
                break
            remaining = None if spec.limit is None else spec.limit - state["candidates"]
            runner.unit(
                shard.as_posix(),
                [shard],
                lambda sub, shard=shard, remaining=remaining: _read_shard(sub, shard, remaining),
                reusable=lambda m, remaining=remaining: _shard_reusable(m, remaining),
                done=done,
            )
    candidates, stopped = state["candidates"], state["stopped"]
    scan.available = candidates
    scan.info["shards"] = len(shards)
    scan.info["available_is_lower_bound"] = stopped
    return scan


def _read_shard(scan: SourceScan, shard: Path, remaining: int | None) -> dict[str, Any]:
    """Ingest the samples of one shard, at most ``remaining`` of them; -> ``{"samples", "stopped", "quota"}``
    (``stopped``: a sample beyond ``remaining`` was seen, so reading stopped there)."""
    from webdataset.tariterators import group_by_keys

    shard_loc = shard.as_posix()
    errors: list[Exception] = []
    samples = 0
    stopped = False
    try:
        for sample in group_by_keys(iter_tar_files(shard, errors=errors), lcase=False):
            if remaining is not None and samples + 1 > remaining:
                stopped = True
                break
            samples += 1
            _ingest_sample(scan, shard_loc, sample)
    except Exception as exc:
        errors.append(exc)
    for exc in errors:
        scan.reject(shard_loc, CORRUPT_SHARD, f"{type(exc).__name__}: {exc}")
    return {"samples": samples, "stopped": stopped, "quota": remaining}


def _shard_reusable(meta: dict[str, Any], remaining: int | None) -> bool:
    """A cached shard result holds for ``remaining``: read with the same quota, or read to its end within it."""
    if meta.get("quota") == remaining:
        return True
    return not meta["stopped"] and (remaining is None or meta["samples"] <= remaining)


def _ingest_sample(scan: SourceScan, shard_loc: str, sample: dict[str, Any]) -> None:
    key = sample["__key__"]
    ext = _image_member(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        scan.reject(f"{shard_loc}#{key}", NO_IMAGE, f"members {members}")
        return
    member = f"{key}.{ext}"
    location = f"{shard_loc}#{member}"
    if "#" in member:
        scan.reject(location, UNSUPPORTED_PATH, "'#' in a member name makes the location ambiguous")
        return
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            scan.reject(location, BAD_LABEL, f"{key}.cls: {exc}")
            return
    _ingest(scan, location, label, sample[ext], location)
