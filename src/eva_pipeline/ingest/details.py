"""Rejection details that are the same from run to run: no memory addresses, no reprs of in-memory streams.

A detail lands in a DVC-tracked listing (the ingestion's ``rejections.jsonl``, the video rejections): text that
changes between runs with nothing changed in the data, such as PIL's ``cannot identify image file <_io.BytesIO
object at 0x7f...>``, would make that output change on every run. Every place that turns an exception into a detail
goes through :func:`exception_detail` (or :func:`stable_text`); :meth:`~eva_pipeline.ingest.scan.SourceScan.reject`
strips addresses once more for plug-in readers.
"""

from __future__ import annotations

import re

#: The repr of an object that shows its address, e.g. ``<_io.BytesIO object at 0x7f12...>``.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
#: Any other address in a repr: `` at 0x7f12...``.
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable_text(text: str, subject: str | None = None) -> str:
    """``text`` without run-dependent parts: an object repr with an address (the in-memory stream an image was
    decoded from) becomes ``subject`` when given (e.g. ``repr(file name)``), and any other ``" at 0x..."`` address
    is dropped."""
    if subject is not None:
        text = _OBJECT_REPR.sub(lambda _: subject, text)  # a function: subject is used verbatim, no escapes
    return _MEMORY_ADDRESS.sub("", text)


def exception_detail(exc: BaseException, subject: str | None = None, *, with_type: bool = True) -> str:
    """``"<ExceptionType>: <message>"`` (just the message without ``with_type``) through :func:`stable_text`."""
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    return stable_text(text, subject)
