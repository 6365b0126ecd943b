"""What the readers of encoded images share: one item decoded into the scan, one image file read, and
:class:`UnitRunner`, which runs a reader's units (files, shards) in order through the scan cache and a decode pool.

Parallel decode: with ``decode_workers > 1`` a :class:`UnitRunner` reads and decodes the next uncached files (or
shards) in a thread pool (Pillow's decoders and hashlib release the GIL) while results are recorded strictly in
scan order, so the manifest, the report and the cache are identical to a single-threaded scan.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from eva_pipeline.ingest.decode import decode_image
from eva_pipeline.ingest.details import exception_detail
from eva_pipeline.ingest.scan import SourceScan, SourceSpec
from eva_pipeline.ingest.scan_cache import KEEP_LABEL, UnitCache

#: Rejection reasons of any reader of files (each reader module defines its own).
MISSING = "missing file"
UNREADABLE = "unreadable file"
UNSUPPORTED_PATH = "unsupported path"


def posix(path: str) -> str:
    return path if os.sep == "/" else Path(path).as_posix()


def ingest_item(scan: SourceScan, location: str, label: int | None, data: bytes, name: str) -> None:
    """Decode ``data`` and record the item as accepted or rejected."""
    image, rejection = decode_image(data, name)
    if rejection is not None:
        scan.reject(location, rejection.reason, rejection.detail)
        return
    assert image is not None
    scan.add(location, label, image.width, image.height, len(data), hashlib.sha1(data).hexdigest())


def ingest_file(scan: SourceScan, location: str, label: int | None) -> None:
    """Read one image file (missing or unreadable -> a rejection) and ingest it."""
    if "#" in location:
        scan.reject(location, UNSUPPORTED_PATH, "'#' is reserved for container members in manifest locations")
        return
    try:
        with open(location, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        scan.reject(location, MISSING, exception_detail(exc, with_type=False))
        return
    except OSError as exc:
        scan.reject(location, UNREADABLE, exception_detail(exc))
        return
    ingest_item(scan, location, label, data, location)


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


def file_unit(runner: UnitRunner, location: str, label: int | None) -> None:
    """One image file as one unit (its cached result is stored without the label, which comes from the folder or
    the list line)."""
    if "#" in location:  # rejected without reading; not a cache unit
        runner.direct(lambda scan: ingest_file(scan, location, label))
    else:
        runner.unit(location, [location], lambda sink: ingest_file(sink, location, None), label=label)


def no_labels_file(spec: SourceSpec) -> None:
    if spec.labels is not None:
        raise ValueError(f"a {spec.kind} source takes no labels file (got {spec.labels})")
