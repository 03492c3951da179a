"""hrm_vision.io: permissions of atomic writes and the one-writer folder lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hrm_vision.io import (
    FolderLock,
    FolderLockedError,
    atomic_write,
    current_umask,
    write_text,
)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


class TestPermissions:
    def test_mode_follows_umask(self, tmp_path: Path, umask_027: None) -> None:
        path = write_text("x", tmp_path / "a.txt")
        assert current_umask() == 0o027
        assert path.stat().st_mode & 0o777 == 0o640
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives, the reference
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777

    def test_default_umask(self, tmp_path: Path) -> None:
        old = os.umask(0o022)
        try:
            path = atomic_write(tmp_path / "b.bin", lambda f: f.write(b"1"))
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == 0o644


HOLDER = textwrap.dedent("""
    import sys, time
    from hrm_vision.io import FolderLock
    lock = FolderLock(sys.argv[1], "holding for a test").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


class TestFolderLock:
    def test_second_holder_is_refused_with_the_first_named(self, tmp_path: Path) -> None:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
            with pytest.raises(FolderLockedError, match=rf"pid {proc.pid} .*holding for a test"):
                FolderLock(tmp_path).acquire()
        finally:
            proc.kill()
            proc.wait()
        # the kernel released the dead holder's lock: no stale lock to clean up
        with FolderLock(tmp_path) as lock:
            assert lock.held

    def test_release_and_reacquire_in_one_process(self, tmp_path: Path) -> None:
        lock = FolderLock(tmp_path / "new").acquire()  # creates the folder
        assert lock.path.is_file()
        lock.release()
        assert not lock.held
        with FolderLock(tmp_path / "new"):
            pass

    def test_stale_temporaries_need_the_lock(self, tmp_path: Path) -> None:
        stale = tmp_path / ".teacher_last.pth.abcd1234.tmp"
        stale.write_bytes(b"half")
        keep = tmp_path / "notes.tmp"
        keep.write_bytes(b"user file")
        lock = FolderLock(tmp_path)
        with pytest.raises(RuntimeError, match="needs the lock"):
            lock.remove_stale_temporaries()
        assert stale.exists()
        with lock:
            assert lock.remove_stale_temporaries() == [stale]
        assert not stale.exists() and keep.exists()


class TestTrainingFolderLock:
    """A second run into a folder in use stops before touching anything in it."""

    def test_second_run_refused_and_folder_untouched(self, tmp_path: Path) -> None:
        from tests.helpers.tiny_run import SCRIPT, prepare

        argv = prepare(tmp_path, epochs=1)
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        in_flight = ckpt / ".teacher_last.pth.abcd1234.tmp"  # the first run's write under way
        in_flight.write_bytes(b"being written")
        (ckpt / "config.json").write_text('{"first": "run"}\n')
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                                  text=True, timeout=300)
        finally:
            holder.kill()
            holder.wait()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert in_flight.read_bytes() == b"being written"
        assert (ckpt / "config.json").read_text() == '{"first": "run"}\n'
        assert not (ckpt / "history.json").exists()
