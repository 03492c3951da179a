"""hrm_vision.io: checkpoints (atomic save, weights_only loading, format version, CPU tensors,
crafted files), ``load``/``save`` for .pth and .safetensors, file permissions, the folder lock,
and size limits on what a file may ask of a loader."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from safetensors import safe_open
from safetensors.torch import save_file

import hrm_vision.io as io_module
from hrm_vision.cli import main as cli_main
from hrm_vision.io import (
    FORMAT_VERSION,
    IMAGE_CONVENTION,
    MAX_METADATA_CHARS,
    WEIGHTS_DIR,
    CheckpointError,
    FolderLock,
    FolderLockedError,
    atomic_write,
    current_umask,
    load,
    load_checkpoint,
    model_entry,
    read_metadata,
    save,
    save_checkpoint,
    shipped_weights,
    to_cpu,
    write_json,
    write_text,
)
from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE, VAEBase, model_name

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- checkpoints
def tiny() -> MinimalVAE:
    return MinimalVAE(latent_dim=8, base_channels=8)


class Evil:
    """Unpickling it would call ``os.remove(marker)``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.remove, (self.marker,))


def test_roundtrip_rebuilds_model_with_same_outputs(tmp_path) -> None:
    model = tiny().eval()
    path = save_checkpoint({**model_entry(model, "student"), "epoch": 3}, tmp_path / "a.pth")
    payload = torch.load(path)  # default weights_only=True must work
    assert payload["epoch"] == 3 and payload["student_arch"]["name"] == "tinyvae"
    loaded = load(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
    assert not loaded.training


def test_missing_role_is_named(tmp_path) -> None:
    path = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="no 'teacher' model.*student"):
        load(path, role="teacher")


def test_other_architecture_names_mismatched_shapes(tmp_path) -> None:
    payload = model_entry(tiny(), "student")
    payload["student_arch"]["latent_dim"] = 16  # claims another architecture
    path = save_checkpoint(payload, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \(8, .*model \(16,"):
        load(path)


def test_not_a_checkpoint_and_truncated(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    good = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "good.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_pickled_object_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("still here")
    path = tmp_path / "evil.pth"
    torch.save({"student_state_dict": {}, "payload": Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert marker.read_text() == "still here"


class TestFormatVersion:
    def test_written_and_accepted(self, tmp_path) -> None:
        path = save_checkpoint({"epoch": 1}, tmp_path / "a.pth")
        assert torch.load(path)["format_version"] == FORMAT_VERSION
        assert load_checkpoint(path)["epoch"] == 1

    def test_missing_version_reads_as_version_1(self, tmp_path) -> None:
        torch.save({"epoch": 1}, tmp_path / "old.pth")
        assert load_checkpoint(tmp_path / "old.pth")["epoch"] == 1

    def test_newer_version_names_both(self, tmp_path) -> None:
        newer = FORMAT_VERSION + 1
        torch.save({"format_version": newer, "epoch": 1}, tmp_path / "new.pth")
        with pytest.raises(CheckpointError, match=rf"format_version {newer}.*version "
                                                  rf"{FORMAT_VERSION} this hrm_vision reads"):
            load_checkpoint(tmp_path / "new.pth")
        with pytest.raises(CheckpointError, match="format_version"):
            load(tmp_path / "new.pth")

    @pytest.mark.parametrize("bad", ["2", 0, 1.5])
    def test_malformed_version_is_refused(self, tmp_path, bad) -> None:
        torch.save({"format_version": bad}, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match="positive integer"):
            load_checkpoint(tmp_path / "bad.pth")


class TestCpuTensors:
    def test_to_cpu_walks_containers(self) -> None:
        t = torch.ones(2, requires_grad=True) * 2
        out = to_cpu({"a": [t, (t, 3)], "b": "x", "c": 1.5})
        assert out["b"] == "x" and out["c"] == 1.5
        assert isinstance(out["a"][1], tuple) and out["a"][1][1] == 3
        assert not out["a"][0].requires_grad and torch.equal(out["a"][0], t.detach())

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_cuda_tensors_are_saved_on_the_cpu(self, tmp_path) -> None:
        model = tiny().cuda()
        opt = torch.optim.AdamW(model.parameters())
        model(torch.rand(2, 3, 32, 32, device="cuda")).reconstruction.mean().backward()
        opt.step()
        path = save_checkpoint({**model_entry(model, "student"),
                                "optimizer_state_dict": opt.state_dict()}, tmp_path / "a.pth")
        locations: set[str] = set()
        torch.load(path, map_location=lambda storage, loc: locations.add(loc) or storage)
        assert locations == {"cpu"}


def test_interrupted_save_keeps_previous_file(tmp_path) -> None:
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    with mock.patch("torch.save", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_teacher_role(tmp_path) -> None:
    teacher = TeacherVAE(latent_dim=8, base_channels=8, blocks_per_stage=1)
    path = save_checkpoint(model_entry(teacher, "teacher"), tmp_path / "teacher.pth")
    assert isinstance(load(path, role="teacher"), TeacherVAE)


class TestNonFinite:
    def test_required_finite_payload_is_refused_by_key_and_nothing_written(self,
                                                                          tmp_path) -> None:
        path = save_checkpoint({"epoch": 1, "w": torch.ones(3)}, tmp_path / "last.pth",
                               require_finite=True)
        state = {"exp_avg_sq": torch.tensor([1.0, float("inf")])}
        payload = {"epoch": 2, "optimizer_state_dict": {"state": {0: state}},
                   "student_state_dict": {"a": torch.tensor([float("nan")]),
                                          "steps": torch.tensor([3])}}
        with pytest.raises(CheckpointError, match=r"refusing to write .*last.pth: NaN or "
                           r"infinite values in optimizer_state_dict.state.0.exp_avg_sq, "
                           r"student_state_dict.a; the previous file is kept"):
            save_checkpoint(payload, path, require_finite=True)
        assert load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
        save_checkpoint(payload, tmp_path / "other.pth")  # not asked: written as given


def crafted(tmp_path, change) -> str:
    """A student checkpoint after ``change(payload)``, saved with plain ``torch.save``."""
    payload = model_entry(tiny(), "student")
    payload["student_state_dict"] = dict(payload["student_state_dict"])
    change(payload)
    path = tmp_path / "crafted.pth"
    torch.save(payload, path)
    return str(path)


def _first_key(payload) -> str:
    return next(iter(payload["student_state_dict"]))


def _nan(payload) -> None:
    key = _first_key(payload)
    payload["student_state_dict"][key] = payload["student_state_dict"][key].clone()
    payload["student_state_dict"][key].view(-1)[0] = float("nan")


CRAFTED = [
    ("a state-dict entry that is a string",
     lambda p: p["student_state_dict"].update({_first_key(p): "weights"}),
     r"must map names to tensors; not a tensor: 'encoder.*' \(str\)"),
    ("a state dict that is a list", lambda p: p.update(student_state_dict=[1, 2]),
     "the state dict must map names to tensors, got list"),
    ("an arch that is not a dict", lambda p: p.update(student_arch="tinyvae"),
     "the architecture must be a dict with a 'name', got str"),
    ("an arch of an unknown model", lambda p: p["student_arch"].update(name="resnet"),
     "unknown model 'resnet'"),
    ("an arch asking for absurd sizes",
     lambda p: p["student_arch"].update(base_channels=3_000_000),
     r"architecture base_channels=3000000 is outside \[0, \d+\], the widest stored"),
    ("an arch with a nested value", lambda p: p["student_arch"].update(latent_dim=[8]),
     "architecture arguments must be numbers or strings"),
    ("NaN weights", _nan, r"\(student\) holds NaN or infinite weights in encoder"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in CRAFTED],
                         ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoint_is_a_checkpoint_error(tmp_path, change, message) -> None:
    path = crafted(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_absurd_arch_is_refused_before_anything_is_built(tmp_path) -> None:
    path = crafted(tmp_path, lambda p: p["student_arch"].update(base_channels=3_000_000))
    with mock.patch("hrm_vision.io.build_model") as build, \
            pytest.raises(CheckpointError, match="outside"):
        load(path)
    assert not build.called


class TestAdapterRole:
    """The student-to-teacher latent adapter, stored with the student, loads on its own."""

    @staticmethod
    def student_with_adapter(tmp_path):
        from hrm_vision.vae import LatentAdapter

        torch.manual_seed(1)
        adapter = LatentAdapter(8, 16)
        with torch.no_grad():
            adapter.proj.bias.uniform_(-1, 1)  # not the default init: the weights must load
        payload = {**model_entry(tiny(), "student"),
                   "adapter_state_dict": adapter.state_dict(),
                   "adapter_arch": adapter.arch_config()}
        return adapter, save_checkpoint(payload, tmp_path / "tinyvae_best.pth")

    def test_load_model_gives_the_stored_adapter_in_eval_mode(self, tmp_path) -> None:
        from hrm_vision.io import adapter_from_payload
        from hrm_vision.vae import LatentAdapter

        adapter, path = self.student_with_adapter(tmp_path)
        loaded = load(path, role="adapter")
        assert isinstance(loaded, LatentAdapter) and not loaded.training
        assert loaded.arch_config() == {"student_dim": 8, "teacher_dim": 16}
        z = torch.randn(3, 8, 4, 4)
        with torch.no_grad():
            got = loaded(z)
            assert got.shape == (3, 16, 4, 4)
            assert torch.equal(got, adapter_from_payload(load_checkpoint(path))(z))
            assert torch.equal(got, adapter(z))
        assert isinstance(load(path), MinimalVAE)  # the student is still the default

    def test_a_checkpoint_without_adapter_names_its_roles(self, tmp_path) -> None:
        path = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "a.pth")
        with pytest.raises(CheckpointError, match=r"no 'adapter' model .*it holds: \['student'\]"):
            load(path, role="adapter")

    def test_a_crafted_adapter_arch_is_refused_before_building(self, tmp_path) -> None:
        _, path = self.student_with_adapter(tmp_path)
        payload = load_checkpoint(path)
        payload["adapter_arch"] = {"student_dim": 8, "teacher_dim": 10**9}
        torch.save(payload, tmp_path / "crafted.pth")
        with mock.patch("hrm_vision.io.LatentAdapter") as build, \
                pytest.raises(CheckpointError,
                              match=r"\(adapter\): adapter_arch teacher_dim=\d+ is outside"):
            load(tmp_path / "crafted.pth", role="adapter")
        assert not build.called

    def test_adapter_weights_that_do_not_fit_are_named(self, tmp_path) -> None:
        _, path = self.student_with_adapter(tmp_path)
        payload = load_checkpoint(path)
        payload["adapter_arch"] = {"student_dim": 8, "teacher_dim": 12}
        torch.save(payload, tmp_path / "other.pth")
        with pytest.raises(CheckpointError, match=r"\(adapter\) does not fit LatentAdapter: "
                                                  r"shape mismatches"):
            load(tmp_path / "other.pth", role="adapter")


class TestTypedAndBoundedLoading:
    """Weights of the wrong dtype and architectures larger than the file are refused."""

    @pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
    def test_integer_or_bool_weights_are_refused(self, tmp_path, dtype) -> None:
        payload = model_entry(tiny(), "student")
        key = next(k for k, v in payload["student_state_dict"].items() if v.is_floating_point())
        payload["student_state_dict"][key] = payload["student_state_dict"][key].to(dtype)
        path = save_checkpoint(payload, tmp_path / "typed.pth")
        with pytest.raises(CheckpointError, match=rf"wrong dtypes .*{key}: checkpoint {dtype}"):
            load(path)

    def test_half_precision_weights_load_cast(self, tmp_path) -> None:
        model = tiny()
        payload = model_entry(model, "student")
        payload["student_state_dict"] = {
            k: v.half() if v.is_floating_point() else v
            for k, v in payload["student_state_dict"].items()}
        loaded = load(save_checkpoint(payload, tmp_path / "half.pth"))
        weight = next(p for p in loaded.parameters())
        assert weight.dtype == torch.float32
        reference = next(p for p in model.parameters())
        assert torch.allclose(weight, reference.half().float())

    def test_zero_element_tensor_does_not_lift_the_bound(self, tmp_path) -> None:
        payload = model_entry(tiny(), "student")
        payload["student_state_dict"]["wide"] = torch.zeros(0, 200_000)
        payload["student_arch"]["base_channels"] = 20_000
        path = save_checkpoint(payload, tmp_path / "wide.pth")
        with pytest.raises(CheckpointError, match=r"base_channels=20000 is outside \[0, \d+\]"):
            load(path)


# ---------------------------------------------------------------------- load and save
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
        st = load(save(student, tmp_path / "tinyvae.safetensors"))
        pth = load(distiller_file)
        z, x = outputs(student, images)
        for loaded in (st, pth):
            assert type(loaded) is MinimalVAE and not loaded.training
            z2, x2 = outputs(loaded, images)
            assert torch.equal(z, z2) and torch.equal(x, x2)
        assert z.abs().sum() > 0 and x.std() > 0  # the comparison is not between blanks

    def test_teacher_round_trip(self, tmp_path: Path, teacher: TeacherVAE,
                                images: torch.Tensor) -> None:
        loaded = load(save(teacher, tmp_path / "t.safetensors"), role="teacher")
        assert torch.equal(outputs(teacher, images)[1], outputs(loaded, images)[1])

    def test_metadata_holds_arch_role_and_image_convention(self, tmp_path: Path,
                                                           student: MinimalVAE) -> None:
        path = save(student, tmp_path / "s.safetensors")
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
        path = save(student, tmp_path / "s.safetensors")
        assert {p.device.type for p in load(path).parameters()} == {"cpu"}
        on_meta = load(path, device="meta")
        assert {p.device.type for p in on_meta.parameters()} == {"meta"}

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to write GPU tensors")
    def test_gpu_checkpoint_loads_on_cpu(self, tmp_path: Path, student: MinimalVAE) -> None:
        on_gpu = MinimalVAE(latent_dim=8, base_channels=8).cuda()
        on_gpu.load_state_dict(student.state_dict())
        path = tmp_path / "gpu.pth"
        torch.save({"student_state_dict": on_gpu.state_dict(),
                    "student_arch": {"name": "tinyvae", **on_gpu.arch_config()}}, path)
        loaded = load(path)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}

    def test_loading_leaves_the_global_rng_alone(self, tmp_path: Path,
                                                 student: MinimalVAE) -> None:
        path = save(student, tmp_path / "s.safetensors")
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        load(path)
        assert torch.equal(torch.rand(3), expected)


class TestChoosingTheModel:
    def test_every_role_loads_from_both_formats(self, tmp_path: Path, student: MinimalVAE,
                                                teacher: TeacherVAE,
                                                images: torch.Tensor) -> None:
        """``load`` picks the format by suffix; each role of each file comes back as saved."""
        torch.manual_seed(3)
        adapter = LatentAdapter(student_dim=8, teacher_dim=16).eval()
        pth = save_checkpoint({**model_entry(student, "student"), **model_entry(teacher, "teacher"),
                               "adapter_state_dict": adapter.state_dict(),
                               "adapter_arch": adapter.arch_config()}, tmp_path / "best.pth")
        files = {"student": save(student, tmp_path / "s.safetensors", adapter=adapter),
                 "teacher": save(teacher, tmp_path / "t.safetensors")}
        z = torch.randn(2, 8, 4, 4)
        for role, model in (("student", student), ("teacher", teacher), ("adapter", adapter)):
            for path in (pth, files.get(role, files["student"])):
                loaded = load(path, role=role)
                assert type(loaded) is type(model) and not loaded.training, (role, path)
                with torch.no_grad():
                    if role == "adapter":
                        assert torch.equal(loaded(z), model(z))
                    else:
                        assert torch.equal(outputs(loaded, images)[1], outputs(model, images)[1])
        assert type(load(pth)) is MinimalVAE  # the student by default

    def test_asked_role_must_be_there(self, tmp_path: Path, distiller_file: Path,
                                      student: MinimalVAE, teacher: TeacherVAE) -> None:
        with pytest.raises(CheckpointError, match=r"no 'adapter' model"):
            load(distiller_file, role="adapter")
        st = save(student, tmp_path / "s.safetensors")
        with pytest.raises(CheckpointError, match=r"holds the 'student' model, not the 'teacher'"):
            load(st, role="teacher")
        pth = save_checkpoint(model_entry(teacher, "teacher"), tmp_path / "teacher.pth")
        with pytest.raises(CheckpointError, match=r"no 'student' model .*it holds: \['teacher'\]"):
            load(pth)
        with pytest.raises(CheckpointError, match=r"holds the 'teacher' model, not the 'student'"):
            load(save(teacher, tmp_path / "t.safetensors"))


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
        return save(student, tmp_path / "good.safetensors")

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
            load(good)
        assert str(good) in str(info.value) and "\n" not in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        for name in ("none.safetensors", "none.pth"):
            with pytest.raises(CheckpointError, match="not found"):
                load(tmp_path / name)

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
            load(path)

    def test_non_finite_weights_are_refused(self, tmp_path: Path, student: MinimalVAE) -> None:
        name = next(k for k, v in student.state_dict().items() if v.is_floating_point())
        bad = student.state_dict()[name].clone()
        bad.view(-1)[0] = float("nan")
        arch = {"name": "tinyvae", **student.arch_config()}
        path = write_safetensors(tmp_path / "nan.safetensors", student, arch,
                                 **{name.replace(".", "__"): bad})
        with pytest.raises(CheckpointError, match=rf"NaN or infinite weights in {name}"):
            load(path)
        pth = tmp_path / "nan.pth"
        entry = model_entry(student, "student")
        entry["student_state_dict"][name] = bad
        save_checkpoint(entry, pth)
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            load(pth)
        broken = randomized(MinimalVAE(latent_dim=8, base_channels=8), 3)
        with torch.no_grad():
            next(broken.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(ValueError, match="NaN or infinite"):
            save(broken, tmp_path / "inf.safetensors")
        assert not (tmp_path / "inf.safetensors").exists()

    def test_newer_format_version_says_upgrade(self, tmp_path: Path,
                                               student: MinimalVAE) -> None:
        path = tmp_path / "new.safetensors"
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path),
                  metadata={"arch": json.dumps({"name": "tinyvae", **student.arch_config()}),
                            "format_version": "99"})
        with pytest.raises(CheckpointError, match="format_version 99, newer.*upgrade"):
            load(path)

    def test_corrupt_pth_and_crafted_arch(self, tmp_path: Path, student: MinimalVAE) -> None:
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load(bad)
        crafted = tmp_path / "crafted.pth"
        save_checkpoint({**model_entry(student, "student"), "student_arch": "tinyvae"}, crafted)
        with pytest.raises(CheckpointError, match="must be a dict"):
            load(crafted, role="student")

    def test_save_wants_the_safetensors_suffix(self, tmp_path: Path,
                                               student: MinimalVAE) -> None:
        with pytest.raises(ValueError, match=r"\.safetensors"):
            save(student, tmp_path / "model.pth")


class TestShippedWeights:
    """``load("NAME")``: weights shipped in the package folder, read by name."""

    @pytest.fixture
    def folder(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        monkeypatch.setattr(io_module, "WEIGHTS_DIR", tmp_path)
        monkeypatch.chdir(tmp_path)  # no file of the name beside the caller
        return tmp_path

    def test_a_name_loads_the_shipped_file_in_its_stored_role(self, folder: Path) -> None:
        student, teacher = tiny().eval(), TeacherVAE(latent_dim=8, base_channels=8).eval()
        save(student, folder / "small_student.safetensors")
        save(teacher.half(), folder / "small_teacher.safetensors")  # fp16 storage, cast on load
        assert shipped_weights() == ["small_student", "small_teacher"]
        x = torch.rand(2, 3, 32, 32)
        loaded = load("small_student")
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), student.encode(x))
        loaded_teacher = load("small_teacher")
        assert isinstance(loaded_teacher, TeacherVAE)
        assert next(loaded_teacher.parameters()).dtype == torch.float32
        with pytest.raises(CheckpointError, match="holds the 'teacher' model"):
            load("small_teacher", role="student")

    def test_an_unknown_name_lists_the_shipped_ones(self, folder: Path) -> None:
        save(tiny(), folder / "small_student.safetensors")
        with pytest.raises(CheckpointError, match=r"no shipped weights named 'nope'.*"
                           r"\['small_student'\]"):
            load("nope")

    def test_a_file_of_that_name_is_read_as_a_file(self, folder: Path) -> None:
        save(tiny(), folder / "small_student.safetensors")
        (folder / "small_student").write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load("small_student")


@pytest.mark.skipif(not shipped_weights(), reason="no weights shipped in hrm_vision/weights yet")
@pytest.mark.parametrize("name", shipped_weights())
def test_shipped_weights_load_by_name_with_their_record(name: str) -> None:
    """Each shipped file loads by name, holds finite weights that decode to [0, 1]-sized
    images, and has a sidecar naming its training data, licences and measured PSNR."""
    record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    model = load(name)
    assert record["model"] == model_name(model) and record["role"] in ("student", "teacher")
    assert record["trained_on"]["packages"] and all(
        p["licenses"] for p in record["trained_on"]["packages"].values())
    assert all(math.isfinite(v) for v in record["psnr_db"].values())
    side = record["image_size"]
    with torch.no_grad():
        out = model(torch.rand(2, 3, side, side)).reconstruction
    assert out.shape == (2, 3, side, side) and torch.isfinite(out).all()


def test_import_of_the_models_does_not_load_safetensors(tmp_path: Path) -> None:
    """``import hrm_vision`` stays light: safetensors comes in when a file is written or read."""
    code = (
        "import json, sys\n"
        "import hrm_vision\n"
        "heavy = ('safetensors',)\n"
        "before = sorted(m for m in heavy if m in sys.modules)\n"
        "m = hrm_vision.MinimalVAE(latent_dim=8, base_channels=8)\n"
        f"hrm_vision.save(m, {str(tmp_path / 'm.safetensors')!r})\n"
        "print(json.dumps([before, 'safetensors' in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [] and after is True


class TestAdapterBeside:
    """``save(..., adapter=...)`` stores the adapter beside the student."""

    @pytest.fixture
    def adapter(self) -> torch.nn.Module:
        from hrm_vision.vae import LatentAdapter

        torch.manual_seed(3)
        return LatentAdapter(student_dim=8, teacher_dim=16).eval()

    def test_both_load_from_one_file(self, tmp_path: Path, student: MinimalVAE,
                                     adapter: torch.nn.Module) -> None:
        from hrm_vision.io import load

        path = save(student, tmp_path / "w.safetensors", adapter=adapter)
        assert json.loads(read_metadata(path)["adapter_arch"]) == {"student_dim": 8,
                                                                   "teacher_dim": 16}
        x = torch.rand(2, 3, 16, 16)
        with torch.no_grad():
            z = student.encode(x)
            assert torch.equal(load(path).encode(x), z)
            assert torch.equal(load(path, role="adapter")(z), adapter(z))

    def test_file_without_adapter_says_so(self, tmp_path: Path, student: MinimalVAE) -> None:
        path = save(student, tmp_path / "w.safetensors")
        with pytest.raises(CheckpointError, match="holds no adapter"):
            load(path, role="adapter")

    def test_adapter_sizes_are_bounded_by_its_tensors(self, tmp_path: Path, student: MinimalVAE,
                                                      adapter: torch.nn.Module) -> None:
        path = save(student, tmp_path / "w.safetensors", adapter=adapter)
        tensors, meta = {}, read_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta["adapter_arch"] = json.dumps({"student_dim": 8, "teacher_dim": 10**9})
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match="adapter_arch"):
            load(path, role="adapter")


# ---------------------------------------------------------------------- writes and the folder lock
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

    @pytest.mark.parametrize("write", [
        lambda p: atomic_write(p / "new" / "b.bin", lambda f: f.write(b"1")),
        lambda p: write_json({"a": float("nan")}, p / "new" / "b.json"),
        lambda p: save_checkpoint({"epoch": 1}, p / "new" / "b.pth"),
        lambda p: save(MinimalVAE(latent_dim=8, base_channels=8), p / "new" / "b.safetensors"),
    ], ids=["atomic_write", "write_json", "save_checkpoint", "save"])
    def test_umask_022_gives_rw_r_r(self, tmp_path: Path, write) -> None:
        """Under umask 022 every writer leaves -rw-r--r-- (not mkstemp's -rw-------) and the
        folders it creates drwxr-xr-x."""
        old = os.umask(0o022)
        try:
            path = write(tmp_path)
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.parent.stat().st_mode & 0o777 == 0o755


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


# ---------------------------------------------------------------------- limits
DEPTH = 100_000
TOO_DEEP = "is nested too deep"


def deep_pickle(depth: int) -> bytes:
    """Pickle opcodes of ``{"history": [[[...]]]}`` nested ``depth`` lists deep (written by
    hand: ``pickle.dumps`` of such a list would itself exceed the recursion limit)."""
    key = b"history"
    return (b"\x80\x02}X" + len(key).to_bytes(4, "little") + key
            + b"]" * depth + b"a" * (depth - 1) + b"s.")


def write_deep_pth(path: Path, depth: int = DEPTH) -> Path:
    """A torch zip checkpoint (as ``torch.save`` writes it) whose pickle is :func:`deep_pickle`."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    template = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in template.namelist():
            data = template.read(name)
            out.writestr(name, deep_pickle(depth) if name.endswith("data.pkl") else data)
    return path


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def write_with_metadata(path: Path, **metadata: str) -> Path:
    """A tiny student's weights with ``metadata`` over what ``save`` writes."""
    torch.manual_seed(0)
    model = MinimalVAE(latent_dim=8, base_channels=8)
    save(model, path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={**read_metadata(path), **metadata})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("limits")
    write_deep_pth(d / "deep.pth")
    write_with_metadata(d / "deep_arch.safetensors", arch=nested_json(20_000))
    write_with_metadata(d / "deeper_arch.safetensors", arch=nested_json(DEPTH))
    write_with_metadata(d / "nested_arch.safetensors", arch=nested_json(40))
    write_with_metadata(d / "deep_adapter.safetensors", adapter_arch=nested_json(20_000))
    write_with_metadata(d / "large.safetensors", images="x" * MAX_METADATA_CHARS)
    return d


class TestPth:
    def test_torch_loads_the_crafted_file(self, files: Path) -> None:
        """The file is what it claims: torch reads the 100,000 levels without recursing."""
        value = torch.load(files / "deep.pth", weights_only=True)["history"]
        depth = 0
        while isinstance(value, list) and value:
            value, depth = value[0], depth + 1
        assert depth == DEPTH - 1  # the innermost list is empty

    @pytest.mark.parametrize("loader", [load_checkpoint, load], ids=["load_checkpoint", "load"])
    def test_loaders_name_the_file(self, files: Path, loader: Callable[[Path], object]) -> None:
        with pytest.raises(CheckpointError, match=f"deep.pth {TOO_DEEP}: more than 32 levels"):
            loader(files / "deep.pth")

    def test_a_checkpoint_of_this_package_nests_little(self, tmp_path: Path) -> None:
        """The bound is far above what a real payload holds (a history record: 4 levels)."""
        payload = {"history": [{"phase": "distill", "val": {"psnr": 20.0}}],
                   "deep": [[[[[[1]]]]]]}
        save_checkpoint(payload, tmp_path / "ok.pth")
        assert load_checkpoint(tmp_path / "ok.pth")["deep"] == [[[[[[1]]]]]]


class TestSafetensors:
    @pytest.mark.parametrize("name, expect", [
        ("deep_arch", "the 'arch' metadata of {p} is nested too deep"),
        ("nested_arch", "the 'arch' metadata of {p} is nested too deep: more than 2 levels"),
        ("deeper_arch", "metadata of {p} is too large: 200"),
        ("large", f"characters, at most {MAX_METADATA_CHARS}"),
    ])
    def test_model_loaders_name_the_file(self, files: Path, name: str, expect: str) -> None:
        path = files / f"{name}.safetensors"
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert expect.format(p=path) in str(info.value)

    def test_adapter_loader_names_the_file(self, files: Path) -> None:
        path = files / "deep_adapter.safetensors"
        with pytest.raises(CheckpointError, match="'adapter_arch' metadata .* nested too deep"):
            load(path, role="adapter")
        assert isinstance(load(path), MinimalVAE)  # a VAE load never reads it


def write_crafted_models(d: Path) -> None:
    """``typed.pth``: a student and a teacher with one int64 weight each; ``wide.pth``: with
    an empty ``(0, 200000)`` tensor and ``base_channels`` 20,000 (an empty tensor must not
    lift the architecture bound)."""
    from hrm_vision.io import model_entry
    from hrm_vision.vae import TeacherVAE

    torch.manual_seed(0)
    entries = {**model_entry(MinimalVAE(latent_dim=8, base_channels=8), "student"),
               **model_entry(TeacherVAE(**tiny_run.TEACHER), "teacher")}
    typed = {k: dict(v) if k.endswith("_state_dict") else v for k, v in entries.items()}
    for role in ("student", "teacher"):
        state = typed[f"{role}_state_dict"]
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].to(torch.int64)
    save_checkpoint(typed, d / "typed.pth")
    wide = {k: dict(v) for k, v in entries.items()}
    for role in ("student", "teacher"):
        wide[f"{role}_state_dict"]["wide"] = torch.zeros(0, 200_000)
        wide[f"{role}_arch"]["base_channels"] = 20_000
    save_checkpoint(wide, d / "wide.pth")


EVALUATE = ["--out-dir", "{d}/evaluation", "--num-images", "8", "--batch-size", "8",
            "--latency-repeats", "1", "--throughput-repeats", "1", "--throughput-batch", "2",
            "--warmup", "0", "--baseline-train-images", "0", "--dataset", "imagefolder",
            "--data-dir", "{d}/images"]


def commands(d: Path, deep: str) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, given the crafted one ``deep``."""
    train = tiny_run.prepare(d, 1, train_samples=16, checkpoint_dir=d / "ckpt")
    return {
        "distill --resume": ["distill", *train, "--resume", deep],
        "distill --teacher-checkpoint": ["distill", *train, "--teacher-checkpoint", deep],
        "evaluate --student": ["evaluate", "--checkpoint-dir", str(d), "--student", deep,
                               *EVALUATE],
        "evaluate --teacher": ["evaluate", "--checkpoint-dir", str(d), "--teacher", deep,
                               *EVALUATE],
        "export": ["export", "--checkpoint", deep, "--out-dir", str(d / "exports"),
                   "--num-images", "4", "--timing-repeats", "0", "--dataset", "imagefolder",
                   "--data-dir", str(d / "images")],
        "irp": ["irp", "--plugin", "tinyvae", "--config",
                "tinyvae=" + json.dumps({"checkpoint": deep}), "--images",
                str(d / "images" / "crop_0000.png")],
    }


COMMANDS = ["distill --resume", "distill --teacher-checkpoint", "evaluate --student",
            "evaluate --teacher", "export", "irp"]
#: Crafted file -> what the message says; the model files are not training checkpoints, so
#: ``--resume`` gets the deep one only (typed weights on resume: test_resume_semantics.py).
CRAFTED_FILES = {"deep.pth": TOO_DEEP, "typed.pth": "wrong dtypes",
           "wide.pth": "base_channels=20000 is outside [0, "}
CASES = [(c, f) for f in CRAFTED_FILES for c in COMMANDS if f == "deep.pth" or "resume" not in c]


@pytest.mark.parametrize("command, crafted", CASES, ids=[f"{c}: {f}" for c, f in CASES])
def test_commands_give_one_line(command: str, crafted: str, files: Path,
                                capsys: pytest.CaptureFixture) -> None:
    if not (files / "typed.pth").exists():
        write_crafted_models(files)
    every = commands(files, str(files / crafted))
    assert sorted(every) == sorted(COMMANDS)
    argv = [a.replace("{d}", str(files)) for a in every[command]]
    status = cli_main(argv)
    err = capsys.readouterr().err
    expect = CRAFTED_FILES[crafted]
    assert "Traceback" not in err and "RecursionError" not in err, err[-3000:]
    assert status in (1, 2) and expect in err, (status, err[-3000:])
    line = next(ln for ln in err.splitlines() if expect in ln)
    assert str(files / crafted) in line and line.strip() != "", line
