"""Deployable weights: ``save_pretrained`` / ``from_pretrained`` with .safetensors and .pth."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hrm_vision.io import (
    IMAGE_CONVENTION,
    CheckpointError,
    load_pretrained,
    load_pretrained_adapter,
    model_entry,
    read_metadata,
    save_checkpoint,
    save_pretrained,
)
from hrm_vision.vae import MinimalVAE, TeacherVAE, VAEBase

ROOT = Path(__file__).resolve().parents[1]


def randomized(model: VAEBase, seed: int) -> VAEBase:
    """``model`` with every parameter random (zero-initialised stages included), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def student() -> MinimalVAE:
    return randomized(MinimalVAE(latent_dim=8, base_channels=8), 0)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def teacher() -> TeacherVAE:
    model = TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1)
    return randomized(model, 1)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def distiller_file(tmp_path: Path, student: MinimalVAE, teacher: TeacherVAE) -> Path:
    """A .pth holding a student and a teacher, as the distiller writes it."""
    path = tmp_path / "tinyvae_best.pth"
    save_checkpoint({**model_entry(student, "student"), **model_entry(teacher, "teacher"),
                     "epoch": 3}, path)
    return path


@torch.no_grad()
def outputs(model: VAEBase, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = model.encode(images)
    return z, model.decode(z)


class TestRoundTrip:
    def test_safetensors_and_pth_give_identical_outputs(self, tmp_path: Path, student: MinimalVAE,
                                                        images: torch.Tensor,
                                                        distiller_file: Path) -> None:
        st = MinimalVAE.from_pretrained(student.save_pretrained(tmp_path / "tinyvae.safetensors"))
        pth = MinimalVAE.from_pretrained(distiller_file)
        z, x = outputs(student, images)
        for loaded in (st, pth):
            assert type(loaded) is MinimalVAE and not loaded.training
            z2, x2 = outputs(loaded, images)
            assert torch.equal(z, z2) and torch.equal(x, x2)
        assert z.abs().sum() > 0 and x.std() > 0  # the comparison is not between blanks

    def test_teacher_round_trip(self, tmp_path: Path, teacher: TeacherVAE,
                                images: torch.Tensor) -> None:
        loaded = TeacherVAE.from_pretrained(save_pretrained(teacher, tmp_path / "t.safetensors"))
        assert torch.equal(outputs(teacher, images)[1], outputs(loaded, images)[1])

    def test_metadata_holds_arch_role_and_image_convention(self, tmp_path: Path,
                                                           student: MinimalVAE) -> None:
        path = save_pretrained(student, tmp_path / "s.safetensors")
        meta = read_metadata(path)
        assert json.loads(meta["arch"]) == {"name": "tinyvae", "latent_dim": 8,
                                            "base_channels": 8}
        assert meta["role"] == "student" and meta["images"] == IMAGE_CONVENTION
        assert "[0, 1]" in meta["images"] and "NCHW" in meta["images"]
        with safe_open(str(path), framework="pt") as f:  # a plain safetensors file
            assert set(f.keys()) == set(student.state_dict())
        assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left

    def test_loads_on_cpu_or_the_device_asked_for(self, tmp_path: Path,
                                                  student: MinimalVAE) -> None:
        path = save_pretrained(student, tmp_path / "s.safetensors")
        assert {p.device.type for p in load_pretrained(path).parameters()} == {"cpu"}
        on_meta = load_pretrained(path, device="meta")
        assert {p.device.type for p in on_meta.parameters()} == {"meta"}

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to write GPU tensors")
    def test_gpu_checkpoint_loads_on_cpu(self, tmp_path: Path, student: MinimalVAE) -> None:
        on_gpu = MinimalVAE(latent_dim=8, base_channels=8).cuda()
        on_gpu.load_state_dict(student.state_dict())
        path = tmp_path / "gpu.pth"
        torch.save({"student_state_dict": on_gpu.state_dict(),
                    "student_arch": {"name": "tinyvae", **on_gpu.arch_config()}}, path)
        loaded = MinimalVAE.from_pretrained(path)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}

    def test_loading_leaves_the_global_rng_alone(self, tmp_path: Path,
                                                 student: MinimalVAE) -> None:
        path = save_pretrained(student, tmp_path / "s.safetensors")
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        MinimalVAE.from_pretrained(path)
        assert torch.equal(torch.rand(3), expected)


class TestChoosingTheModel:
    def test_class_picks_its_role_in_a_distiller_checkpoint(self, distiller_file: Path) -> None:
        assert type(MinimalVAE.from_pretrained(distiller_file)) is MinimalVAE
        assert type(TeacherVAE.from_pretrained(distiller_file)) is TeacherVAE
        assert type(load_pretrained(distiller_file)) is MinimalVAE  # the student by default
        assert type(load_pretrained(distiller_file, role="teacher")) is TeacherVAE

    def test_teacher_file_into_minimalvae_is_a_clear_error(self, tmp_path: Path,
                                                           teacher: TeacherVAE) -> None:
        st = save_pretrained(teacher, tmp_path / "teacher.safetensors")
        with pytest.raises(CheckpointError, match=r"holds a TeacherVAE .*not a MinimalVAE"):
            MinimalVAE.from_pretrained(st)
        pth = tmp_path / "teacher.pth"
        save_checkpoint(model_entry(teacher, "teacher"), pth)
        with pytest.raises(CheckpointError, match=r"holds no MinimalVAE; it holds: teacher"):
            MinimalVAE.from_pretrained(pth)

    def test_asked_role_must_be_there(self, tmp_path: Path, distiller_file: Path,
                                      student: MinimalVAE) -> None:
        with pytest.raises(CheckpointError, match=r"holds a TeacherVAE"):
            MinimalVAE.from_pretrained(distiller_file, role="teacher")
        with pytest.raises(CheckpointError, match=r"no 'adapter' model"):
            load_pretrained(distiller_file, role="adapter")
        st = save_pretrained(student, tmp_path / "s.safetensors")
        with pytest.raises(CheckpointError, match=r"holds the 'student' model, not the 'teacher'"):
            load_pretrained(st, role="teacher")


def write_safetensors(path: Path, model: VAEBase, arch: dict | str | None,
                      **tensor_changes: torch.Tensor) -> Path:
    """A .safetensors file with ``arch`` metadata (a dict is dumped to JSON; None: no arch)."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({k.replace("__", "."): v for k, v in tensor_changes.items()})
    meta = {"role": "student"}
    if arch is not None:
        meta["arch"] = arch if isinstance(arch, str) else json.dumps(arch)
    save_file(tensors, str(path), metadata=meta)
    return path


class TestBadFiles:
    @pytest.fixture
    def good(self, tmp_path: Path, student: MinimalVAE) -> Path:
        return save_pretrained(student, tmp_path / "good.safetensors")

    @pytest.mark.parametrize("damage, message", [
        (lambda b: b[: len(b) // 2], "not a readable safetensors file"),
        (lambda b: b[:5], "not a readable safetensors file"),
        (lambda b: b"", "not a readable safetensors file"),
        (lambda b: struct.pack("<Q", 10 ** 12) + b[8:], "not a readable safetensors file"),
        (lambda b: os.urandom(256), "not a readable safetensors file"),
    ], ids=["truncated", "five-bytes", "empty", "huge-header", "random"])
    def test_corrupt_safetensors_is_a_clear_error(self, good: Path, damage, message: str) -> None:
        good.write_bytes(damage(good.read_bytes()))
        with pytest.raises(CheckpointError, match=message) as info:
            MinimalVAE.from_pretrained(good)
        assert str(good) in str(info.value) and "\n" not in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        for name in ("none.safetensors", "none.pth"):
            with pytest.raises(CheckpointError, match="not found"):
                MinimalVAE.from_pretrained(tmp_path / name)

    @pytest.mark.parametrize("arch, message", [
        (None, "no 'arch' metadata"),
        ("{not json", "not valid JSON"),
        ('["tinyvae"]', "must be a dict"),
        ({"name": "resnet"}, "unknown model 'resnet'"),
        ({"name": "tinyvae", "latent_dim": 8, "base_channels": 8, "depth": 3},
         "cannot rebuild"),
        ({"name": "tinyvae", "latent_dim": 16, "base_channels": 8}, "shape mismatches"),
        # 10**9 channels: refused from the stored shapes before the model is built
        ({"name": "tinyvae", "latent_dim": 10 ** 9, "base_channels": 8},
         r"latent_dim=1000000000 is outside \[0, 192\]"),
        ({"name": "tinyvae", "latent_dim": -1, "base_channels": 8}, "outside"),
    ], ids=["no-arch", "bad-json", "not-a-dict", "unknown", "bad-kwarg", "other-size", "absurd",
        "negative"])
    def test_bad_arch_metadata(self, tmp_path: Path, student: MinimalVAE, arch,
                               message: str) -> None:
        path = write_safetensors(tmp_path / "x.safetensors", student, arch)
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(path)

    def test_non_finite_weights_are_refused(self, tmp_path: Path, student: MinimalVAE) -> None:
        name = next(k for k, v in student.state_dict().items() if v.is_floating_point())
        bad = student.state_dict()[name].clone()
        bad.view(-1)[0] = float("nan")
        arch = {"name": "tinyvae", **student.arch_config()}
        path = write_safetensors(tmp_path / "nan.safetensors", student, arch,
                                 **{name.replace(".", "__"): bad})
        with pytest.raises(CheckpointError, match=rf"NaN or infinite weights in {name}"):
            load_pretrained(path)
        pth = tmp_path / "nan.pth"
        entry = model_entry(student, "student")
        entry["student_state_dict"][name] = bad
        save_checkpoint(entry, pth)
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            MinimalVAE.from_pretrained(pth)
        broken = randomized(MinimalVAE(latent_dim=8, base_channels=8), 3)
        with torch.no_grad():
            next(broken.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(ValueError, match="non-finite"):
            save_pretrained(broken, tmp_path / "inf.safetensors")
        assert not (tmp_path / "inf.safetensors").exists()

    def test_newer_format_version_says_upgrade(self, tmp_path: Path,
                                               student: MinimalVAE) -> None:
        path = tmp_path / "new.safetensors"
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path),
                  metadata={"arch": json.dumps({"name": "tinyvae", **student.arch_config()}),
                            "format_version": "99"})
        with pytest.raises(CheckpointError, match="format_version '99'.*upgrade"):
            load_pretrained(path)

    def test_corrupt_pth_and_crafted_arch(self, tmp_path: Path, student: MinimalVAE) -> None:
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            MinimalVAE.from_pretrained(bad)
        crafted = tmp_path / "crafted.pth"
        save_checkpoint({**model_entry(student, "student"), "student_arch": "tinyvae"}, crafted)
        with pytest.raises(CheckpointError, match="must be a dict"):
            load_pretrained(crafted, role="student")

    def test_save_wants_the_safetensors_suffix(self, tmp_path: Path,
                                               student: MinimalVAE) -> None:
        with pytest.raises(ValueError, match=r"\.safetensors"):
            save_pretrained(student, tmp_path / "model.pth")


def test_import_of_the_models_does_not_load_safetensors(tmp_path: Path) -> None:
    """``import hrm_vision.vae`` stays light; safetensors comes in when a file is written or read
    (the reader and writer themselves, :mod:`hrm_vision.io` over
    :mod:`hrm_vision.io`, import only torch)."""
    code = (
        "import json, sys\n"
        "import hrm_vision.vae as v\n"
        "heavy = ('safetensors',)\n"
        "before = sorted(m for m in heavy if m in sys.modules)\n"
        "m = v.MinimalVAE(latent_dim=8, base_channels=8)\n"
        f"m.save_pretrained({str(tmp_path / 'm.safetensors')!r})\n"
        "print(json.dumps([before, 'safetensors' in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [] and after is True


class TestAdapterBeside:
    """``save_pretrained(..., adapter=...)`` stores the adapter beside the student."""

    @pytest.fixture
    def adapter(self) -> torch.nn.Module:
        from hrm_vision.vae import LatentAdapter

        torch.manual_seed(3)
        return LatentAdapter(student_dim=8, teacher_dim=16).eval()

    def test_both_load_from_one_file(self, tmp_path: Path, student: MinimalVAE,
                                     adapter: torch.nn.Module) -> None:
        from hrm_vision.io import load_model

        path = save_pretrained(student, tmp_path / "w.safetensors", adapter=adapter)
        assert json.loads(read_metadata(path)["adapter_arch"]) == {"student_dim": 8,
                                                                   "teacher_dim": 16}
        x = torch.rand(2, 3, 16, 16)
        with torch.no_grad():
            z = student.encode(x)
            assert torch.equal(MinimalVAE.from_pretrained(path).encode(x), z)
            assert torch.equal(load_pretrained_adapter(path)(z), adapter(z))
        with pytest.raises(CheckpointError, match="from_pretrained"):
            load_model(path)  # .pth files only: the error names the loader of this file

    def test_file_without_adapter_says_so(self, tmp_path: Path, student: MinimalVAE) -> None:
        path = save_pretrained(student, tmp_path / "w.safetensors")
        with pytest.raises(CheckpointError, match="holds no adapter"):
            load_pretrained_adapter(path)

    def test_adapter_sizes_are_bounded_by_its_tensors(self, tmp_path: Path, student: MinimalVAE,
                                                      adapter: torch.nn.Module) -> None:
        path = save_pretrained(student, tmp_path / "w.safetensors", adapter=adapter)
        tensors, meta = {}, read_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta["adapter_arch"] = json.dumps({"student_dim": 8, "teacher_dim": 10**9})
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match="adapter_arch"):
            load_pretrained_adapter(path)
