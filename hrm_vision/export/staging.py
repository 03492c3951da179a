"""Export sets that replace each other whole: :class:`ExportSet`.

Every file of an export (graphs, weights, ``export.json``) is written into a staging folder
beside the target (``.{name}.XXXXXXXX.export``), checked there, and the staging folder then
takes the target's place in one ``rename`` (on Linux ``renameat2(RENAME_EXCHANGE)``, so a
reader sees the old set or the new one, never a mix). A failure, an interrupt or a SIGTERM
before that leaves the target as it was and removes the staging folder; a SIGKILL leaves the
staging folder, which the next export beside it removes (a live export holds a
:class:`~hrm_vision.io.FolderLock` on its own). Files in the target that an export does not
write are kept (hard-linked into the new set); a target holding a folder or another
non-regular entry is refused before anything is written. A write that fails (full disk) is an
``OSError`` naming the file at its final place.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ..io import FolderLock, FolderLockedError

#: Names an export writes; anything else found in the target is carried over unchanged.
EXPORT_NAME = re.compile(r"^(tinyvae.*\.(onnx|torchscript\.pt|safetensors)|export\.json)$")
#: Exit status of an export stopped by SIGTERM (128 + 15, as the trainer).
SIGTERM_STATUS = 143
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


class ExportSet:
    """A ``with`` block whose files (written under :attr:`folder`) replace ``target`` whole when
    the block ends without an exception (see the module docstring).

    Raises (on entering):
        OSError: ``target`` exists and is not a folder, holds a subfolder or another
            non-regular entry, or the staging folder cannot be made.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.folder = self.target  # the staging folder once entered
        self._lock: FolderLock | None = None
        self._previous_handler: Any = None

    def __enter__(self) -> ExportSet:
        self._check_target()
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(self.target)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".export",
                                            dir=parent))
        self._lock = FolderLock(self.folder, purpose="exporting").acquire()
        self._catch_sigterm()
        return self

    def _check_target(self) -> None:
        if not self.target.exists():
            return
        if not self.target.is_dir():
            raise NotADirectoryError(f"--out-dir {self.target} is not a folder")
        odd = sorted(p.name for p in self.target.iterdir()
                     if not p.is_file() or p.is_symlink())
        if odd:
            raise IsADirectoryError(
                f"{self.target} holds {', '.join(odd[:5])}, which an export would not keep "
                "(subfolders, links); export into an empty folder or a previous export's")

    def _catch_sigterm(self) -> None:
        """SIGTERM raises ``SystemExit(143)`` inside the block (so the staging folder is removed),
        unless the program installed its own handler."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def stop(signum: int, frame: FrameType | None) -> None:
                raise SystemExit(SIGTERM_STATUS)

            self._previous_handler = signal.signal(signal.SIGTERM, stop)

    def final_path(self, path: str | os.PathLike[str]) -> str:
        """Where a file written at ``path`` in the staging folder ends up."""
        relative = Path(path).relative_to(self.folder)
        return str(self.target / relative)

    def relocate(self, value: Any) -> Any:
        """``value`` (a dataclass, dict, list or string) with every path in the staging folder
        replaced by its :meth:`final_path`."""
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{f.name: self.relocate(getattr(value, f.name))
                                                 for f in dataclasses.fields(value)})
        if isinstance(value, dict):
            return {k: self.relocate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.relocate(v) for v in value]
        if isinstance(value, str) and value.startswith(str(self.folder) + os.sep):
            return self.final_path(value)
        return value

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is None:
                self._commit()
        except BaseException as error:
            self._discard()
            named = self._named(error)
            if named is error:
                raise
            raise named from error
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
        if exc is not None:
            self._discard()
            named = self._named(exc)
            if named is not exc:
                raise named from exc

    def _named(self, exc: BaseException) -> BaseException:
        """An ``OSError`` whose message names a staged file, naming it at its final place."""
        if not isinstance(exc, OSError) or self.folder == self.target:
            return exc
        message = str(exc.strerror or exc)
        stage = str(self.folder)
        if stage not in message:
            return exc
        message = message.replace(stage, str(self.target))
        return type(exc)(exc.errno, message) if exc.errno is not None else type(exc)(message)

    def _commit(self) -> None:
        self._check_target()
        if self.target.exists():
            for entry in self.target.iterdir():  # files of the user's: kept as they are
                if not EXPORT_NAME.match(entry.name) and entry.name != FolderLock.NAME \
                        and not (self.folder / entry.name).exists():
                    try:
                        os.link(entry, self.folder / entry.name)
                    except OSError:
                        shutil.copy2(entry, self.folder / entry.name)
            if not _exchange(self.folder, self.target):  # not atomic: a moment with no target
                old = self.target.parent / f"{self.folder.name}.old"
                os.replace(self.target, old)
                os.replace(self.folder, self.target)
                os.replace(old, self.folder)
            # the old set is now at self.folder (still locked by us): deleted by _discard
        else:
            os.replace(self.folder, self.target)
        with contextlib.suppress(FileNotFoundError):
            (self.target / FolderLock.NAME).unlink()
        self._discard()

    def _discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def remove_stale_stages(target: Path) -> list[Path]:
    """Delete the staging folders of exports into ``target`` that were killed (their lock is
    free); returns what was deleted. Live exports' folders are kept."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.export$")
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        if not (pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        lock = FolderLock(entry, purpose="cleaning up")
        try:
            lock.acquire()
        except (FolderLockedError, OSError):
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            lock.release()
    return sorted(removed)
