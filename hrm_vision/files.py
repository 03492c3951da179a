"""Atomic file writes: a crash at any moment leaves the previous file or the new one, never a
half-written one.

Every file the package writes for later reading (checkpoints, ``history.json``, the effective
config, reports) goes through :func:`atomic_write`: the bytes go to a temporary file in the same
directory (``.{name}.XXXX.tmp``), are flushed and fsynced, then ``os.replace`` puts the file in
place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it into place.

    Parent directories are created. If ``write`` (or anything before the rename) raises, the
    temporary file is removed and ``path`` is untouched. Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike[str], indent: int = 1) -> Path:
    """Atomically write ``data`` as JSON; NaN/inf become ``null`` so the file stays valid JSON."""
    return write_text(json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n", path)
