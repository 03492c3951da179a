"""Atomic file writes: a crash at any moment leaves the previous file or the new one, never a
half-written one.

Every file the package writes for later reading (checkpoints, ``history.json``, the effective
config, reports) goes through :func:`atomic_write`: the bytes go to a temporary file in the same
directory (``.{name}.XXXX.tmp``), are flushed and fsynced, then ``os.replace`` puts the file in
place. A write that fails for lack of space or any other I/O reason is an ``OSError`` naming the
file (also when the writer, like ``torch.save``, wraps it in another exception); the temporary
file is removed. :func:`remove_stale_temporaries` deletes the temporary files that a killed
process leaves behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Names of the temporary files :func:`atomic_write` creates (``.{name}.XXXXXXXX.tmp``).
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the first one in its cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it into place.

    Parent directories are created. If ``write`` (or anything before the rename) raises, the
    temporary file is removed and ``path`` is untouched. Returns ``path`` as a ``Path``.

    Raises:
        OSError: the file could not be written (no space left, a read-only folder, a folder
            where the file should be, ...): same ``errno`` and reason, with ``path`` as its
            filename, even when ``write`` wrapped the ``OSError`` in another exception.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        reason = cause.strerror or str(cause) or type(cause).__name__
        if cause.errno is None:
            raise type(cause)(f"cannot write {path}: {reason}") from exc
        raise type(cause)(cause.errno, f"cannot write {path}: {reason}") from exc
    return path


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` left in ``folder`` by a process that
    was killed mid-write (``.{name}.XXXXXXXX.tmp``); returns what was deleted. Only call it
    when no other process writes into ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if TEMPORARY_NAME.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return sorted(removed)


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
