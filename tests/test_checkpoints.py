"""Checkpoint files: atomic save, weights_only loading, clear errors, model rebuilding, the
format version, CPU tensors."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from hrm_vision.io import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_model,
    model_entry,
    save_checkpoint,
    to_cpu,
)
from hrm_vision.vae import MinimalVAE, TeacherVAE


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
    loaded = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
    assert not loaded.training


def test_missing_role_is_named(tmp_path) -> None:
    path = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="no 'teacher' model.*student"):
        load_model(path, role="teacher")


def test_other_architecture_names_mismatched_shapes(tmp_path) -> None:
    payload = model_entry(tiny(), "student")
    payload["student_arch"]["latent_dim"] = 16  # claims another architecture
    path = save_checkpoint(payload, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \(8, .*model \(16,"):
        load_model(path)


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
            load_model(tmp_path / "new.pth")

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
    assert isinstance(load_model(path, role="teacher"), TeacherVAE)


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
        load_model(path)


def test_absurd_arch_is_refused_before_anything_is_built(tmp_path) -> None:
    path = crafted(tmp_path, lambda p: p["student_arch"].update(base_channels=3_000_000))
    with mock.patch("hrm_vision.io.build_model") as build, \
            pytest.raises(CheckpointError, match="outside"):
        load_model(path)
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
        loaded = load_model(path, role="adapter")
        assert isinstance(loaded, LatentAdapter) and not loaded.training
        assert loaded.arch_config() == {"student_dim": 8, "teacher_dim": 16}
        z = torch.randn(3, 8, 4, 4)
        with torch.no_grad():
            got = loaded(z)
            assert got.shape == (3, 16, 4, 4)
            assert torch.equal(got, adapter_from_payload(load_checkpoint(path))(z))
            assert torch.equal(got, adapter(z))
        assert isinstance(load_model(path), MinimalVAE)  # the student is still the default

    def test_a_checkpoint_without_adapter_names_its_roles(self, tmp_path) -> None:
        path = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "a.pth")
        with pytest.raises(CheckpointError, match=r"no 'adapter' model .*it holds: \['student'\]"):
            load_model(path, role="adapter")

    def test_a_crafted_adapter_arch_is_refused_before_building(self, tmp_path) -> None:
        _, path = self.student_with_adapter(tmp_path)
        payload = load_checkpoint(path)
        payload["adapter_arch"] = {"student_dim": 8, "teacher_dim": 10**9}
        torch.save(payload, tmp_path / "crafted.pth")
        with mock.patch("hrm_vision.vae.LatentAdapter") as build, \
                pytest.raises(CheckpointError,
                              match=r"\(adapter\): adapter_arch teacher_dim=\d+ is outside"):
            load_model(tmp_path / "crafted.pth", role="adapter")
        assert not build.called

    def test_adapter_weights_that_do_not_fit_are_named(self, tmp_path) -> None:
        _, path = self.student_with_adapter(tmp_path)
        payload = load_checkpoint(path)
        payload["adapter_arch"] = {"student_dim": 8, "teacher_dim": 12}
        torch.save(payload, tmp_path / "other.pth")
        with pytest.raises(CheckpointError, match=r"\(adapter\) does not fit LatentAdapter: "
                                                  r"shape mismatches"):
            load_model(tmp_path / "other.pth", role="adapter")


class TestTypedAndBoundedLoading:
    """Weights of the wrong dtype and architectures larger than the file are refused."""

    @pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
    def test_integer_or_bool_weights_are_refused(self, tmp_path, dtype) -> None:
        payload = model_entry(tiny(), "student")
        key = next(k for k, v in payload["student_state_dict"].items() if v.is_floating_point())
        payload["student_state_dict"][key] = payload["student_state_dict"][key].to(dtype)
        path = save_checkpoint(payload, tmp_path / "typed.pth")
        with pytest.raises(CheckpointError, match=rf"wrong dtypes .*{key}: checkpoint {dtype}"):
            load_model(path)

    def test_half_precision_weights_load_cast(self, tmp_path) -> None:
        model = tiny()
        payload = model_entry(model, "student")
        payload["student_state_dict"] = {
            k: v.half() if v.is_floating_point() else v
            for k, v in payload["student_state_dict"].items()}
        loaded = load_model(save_checkpoint(payload, tmp_path / "half.pth"))
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
            load_model(path)
