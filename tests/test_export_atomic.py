"""An export replaces the previous set whole: a failure, a SIGTERM or a full disk in the middle
of an export into a folder holding an earlier export leaves that export as it was (no new
encoder beside an old decoder), names the file that could not be written and leaves no staging
folder; files of the user's in the folder are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hrm_vision.export import ExportSet, export_model
from hrm_vision.export import pipeline as export_pipeline
from hrm_vision.export.staging import remove_stale_stages
from hrm_vision.io import FolderLock
from hrm_vision.vae import MinimalVAE

ROOT = Path(__file__).resolve().parents[1]


def student(seed: int) -> MinimalVAE:
    torch.manual_seed(seed)
    return MinimalVAE(latent_dim=4, base_channels=8).eval()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries beside ``folder`` (staging folders) and inside it (temporaries)."""
    return sorted(p.name for p in [*folder.parent.iterdir(), *folder.iterdir()]
                  if p.name.startswith("."))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An export of one student into ``out`` (with a user's file beside it) and its bytes."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("atomic") / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's\n")
    export_model(student(0), out, torch.rand(2, 3, 16, 16))
    return out, snapshot(out)


def test_a_failure_midway_leaves_the_previous_set(first, monkeypatch) -> None:
    out, before = first
    assert {"tinyvae_encoder.onnx", "tinyvae_decoder.torchscript.pt", "tinyvae.safetensors",
            "notes.txt"} <= set(before)

    def fail(*args, **kwargs):
        raise RuntimeError("the weights writer broke")

    monkeypatch.setattr(export_pipeline, "save", fail)  # after every graph
    with pytest.raises(RuntimeError, match="weights writer broke"):
        export_model(student(1), out, torch.rand(2, 3, 16, 16))
    assert snapshot(out) == before
    assert leftovers(out) == []


def _run(script: str, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails: EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=600)


SIGTERM_MIDWAY = """
import os, signal, sys, torch
from hrm_vision.export import pipeline
from hrm_vision.vae import MinimalVAE
real = pipeline.export_torchscript
def stop(*args, **kwargs):
    path = real(*args, **kwargs)  # the encoder's TorchScript is written, then SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)
    return path
pipeline.export_torchscript = stop
torch.manual_seed(1)
pipeline.export_model(MinimalVAE(latent_dim=4, base_channels=8).eval(), sys.argv[1],
                      torch.rand(2, 3, 16, 16))
"""


def test_sigterm_midway_exits_143_and_leaves_the_previous_set(first) -> None:
    out, before = first
    proc = _run(SIGTERM_MIDWAY, str(out))
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert snapshot(out) == before
    assert leftovers(out) == []


FULL_DISK = """
import sys, torch
from hrm_vision.export import pipeline, torchscript, graphs
from hrm_vision.vae import MinimalVAE
torch.manual_seed(1)
model = MinimalVAE(latent_dim=4, base_channels=8).eval()
for name, call in [
    ("torchscript", lambda: torchscript.export_torchscript(
        graphs.VAEGraph(model, "decoder"), graphs.graph_specs(model, 16)[1],
        __import__("pathlib").Path(sys.argv[2]) / "decoder.torchscript.pt", {})),
    ("export", lambda: pipeline.export_model(model, sys.argv[1], torch.rand(2, 3, 16, 16))),
]:
    try:
        call()
        print(name, "written")
    except OSError as exc:
        print(name, "OSError", exc)
"""


def test_a_full_disk_names_the_file_and_leaves_the_previous_set(first, tmp_path) -> None:
    out, before = first
    proc = _run(FULL_DISK, str(out), str(tmp_path), fsize=4096)
    assert proc.returncode == 0, proc.stderr[-2000:]  # no SIGABRT from the TorchScript writer
    lines = proc.stdout.splitlines()
    assert any(f"cannot write {tmp_path / 'decoder.torchscript.pt'}: File too large" in line
               for line in lines if line.startswith("torchscript OSError")), proc.stdout
    assert any(f"cannot write {out / 'tinyvae_encoder.onnx'}: File too large" in line
               for line in lines if line.startswith("export OSError")), proc.stdout
    assert list(tmp_path.iterdir()) == []  # no truncated file, no temporary
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_a_new_set_replaces_the_old_whole_and_keeps_the_users_files(first, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's\n")
    export_model(student(0), out, torch.rand(2, 3, 16, 16), precisions=("fp32", "fp16"))
    assert (out / "tinyvae_encoder.fp16.onnx").is_file()
    export_model(student(1), out, torch.rand(2, 3, 16, 16))
    after = snapshot(out)
    assert "tinyvae_encoder.fp16.onnx" not in after  # no stale file of the earlier set
    assert after["notes.txt"] == b"the user's\n"
    _, first_bytes = first
    for name in ("tinyvae_encoder.onnx", "tinyvae_decoder.onnx", "tinyvae.safetensors"):
        assert after[name] != first_bytes[name], name  # another model's files, all of them
    assert leftovers(out) == []


def test_a_killed_exports_staging_folder_is_removed_a_live_one_kept(tmp_path) -> None:
    target = tmp_path / "out"
    dead = tmp_path / ".out.abcdefgh.export"
    dead.mkdir()
    (dead / "tinyvae_encoder.onnx").write_bytes(b"half")
    live = tmp_path / ".out.livelive.export"
    with FolderLock(live):
        assert remove_stale_stages(target) == [dead]
        assert live.is_dir()


def test_a_subfolder_in_the_target_is_refused_before_writing(tmp_path) -> None:
    (tmp_path / "out" / "sub").mkdir(parents=True)
    with pytest.raises(OSError, match="holds sub"), ExportSet(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
