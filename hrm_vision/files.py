"""Atomic file writes: a crash at any moment leaves the previous file or the new one, never a
half-written one.

Every file the package writes for later reading (checkpoints, ``history.json``, the effective
config, reports) goes through :func:`atomic_write`: the bytes go to a temporary file in the same
directory (``.{name}.XXXX.tmp``), are flushed and fsynced, then ``os.replace`` puts the file in
place. A write that fails for lack of space or any other I/O reason is an ``OSError`` naming the
file (also when the writer, like ``torch.save``, wraps it in another exception); the temporary
file is removed. Written files get the permissions ``open()`` would give them (``0o666`` less the
process umask), not the ``0o600`` of a temporary file.

:class:`FolderLock` makes one process the only writer of a folder (an OS lock, released by the
kernel when the holder dies, so a killed run leaves no stale lock); only its holder deletes the
temporary files that a killed process left behind (:meth:`FolderLock.remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
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


def current_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.fchmod(fd, 0o666 & ~current_umask())
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


class FolderLockedError(OSError):
    """Another live process holds the folder's :class:`FolderLock`; the message names it."""


class FolderLock:
    """An exclusive lock on ``folder`` for one writer, held from :meth:`acquire` to
    :meth:`release` (or for a ``with`` block).

    The lock is ``fcntl.flock`` on ``folder/.lock``, which also records the holder's pid, host
    and start time for the error another process gets. The kernel drops the lock when the holder
    exits or is killed, so there is never a stale lock to delete: a file a killed holder left is
    locked again by the next writer. :meth:`release` deletes the file while still holding the
    lock, so a finished run leaves only its outputs; :meth:`acquire` therefore checks that the
    file it locked is still the one at ``folder/.lock`` and otherwise opens it again.

    Raises (from :meth:`acquire`):
        FolderLockedError: another process holds the lock (named in the message).
        OSError: the folder cannot be created or the lock file opened (read-only mount, ...).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str], purpose: str = "writing") -> None:
        self.folder = Path(folder)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        import fcntl

        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise FolderLockedError(
                    f"{self.folder} is in use by another process ({self._describe(holder)}); "
                    "wait for it to finish, or use another folder") from None
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # a releasing holder deleted the file after we opened it: open anew
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "purpose": self.purpose}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        self._fd = fd
        return self

    @staticmethod
    def _describe(holder: str) -> str:
        try:
            info = json.loads(holder)
            return (f"pid {info['pid']} on {info['host']}, {info['purpose']} since "
                    f"{info['started']}")
        except (ValueError, KeyError, TypeError):
            return "holder unknown"

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is the file now at :attr:`path` (not one a releasing holder deleted)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # still locked: no writer holds the file being deleted
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of :func:`atomic_write` that a killed process left in the
        folder (``.{name}.XXXXXXXX.tmp``); returns what was deleted. Only the lock's holder may,
        since no other process then writes there.

        Raises:
            RuntimeError: the lock is not held.
        """
        if self._fd is None:
            raise RuntimeError(f"remove_stale_temporaries needs the lock on {self.folder}")
        removed = []
        for entry in self.folder.iterdir():
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
