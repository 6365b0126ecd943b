"""Writing a file so that readers, and a process killed halfway, never leave half of it in place (stdlib only)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_atomically(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, then rename it over ``path``; -> ``path``.

    Readers see the old file or the whole new one. The temporary (``.<name>.tmp<pid>-<random>``) is unique per call,
    so processes on several hosts sharing a folder never write into one another's, and it is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
