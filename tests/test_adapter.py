"""The latent adapter's start from the two models' linear paths, and cross-decoding."""

from __future__ import annotations

import torch

from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE


def test_linear_path_maps_match_the_models(photo_batch) -> None:
    model = MinimalVAE(latent_dim=16, base_channels=8).eval()
    model.init_from_data(photo_batch)
    enc_w, enc_b, dec_w, dec_b = model.linear_path()
    patches = torch.nn.functional.pixel_unshuffle(photo_batch, 8)  # (B, 192, 4, 4)
    z = torch.einsum("lp,bphw->blhw", enc_w, patches) + enc_b[None, :, None, None]
    with torch.no_grad():  # fresh model: the nonlinear branches are still zero
        assert torch.allclose(model.encode(photo_batch), z, atol=1e-4)
        rec = torch.einsum("pl,blhw->bphw", dec_w, z) + dec_b[None, :, None, None]
        expected = model.decode(z)
    assert torch.allclose(torch.nn.functional.pixel_shuffle(rec, 8).clamp(0, 1), expected,
                          atol=1e-4)


def test_fresh_adapter_lets_the_teacher_decode_the_student(photo_batch) -> None:
    student, teacher = MinimalVAE().eval(), TeacherVAE().eval()
    student.init_from_data(photo_batch)
    teacher.init_from_data(photo_batch.flip(-1))  # another basis: the composition handles it
    adapter = LatentAdapter(128, 512)
    before = adapter.proj.weight.clone()
    assert adapter.init_from_linear_paths(student, teacher)
    assert not torch.equal(adapter.proj.weight, before)
    with torch.no_grad():
        z = student.encode(photo_batch)
        cross = teacher.decode(adapter(z))
        own = student.decode(z)
    assert torch.allclose(cross, own, atol=1e-3)


def test_models_without_linear_paths_are_left_alone() -> None:
    adapter = LatentAdapter(4, 8)
    before = adapter.proj.weight.clone()
    assert not adapter.init_from_linear_paths(torch.nn.Identity(), torch.nn.Identity())
    assert torch.equal(adapter.proj.weight, before)


def test_a_crafted_adapter_size_is_refused_before_building() -> None:
    import pytest

    from hrm_vision.io import CheckpointError, adapter_from_payload

    state = LatentAdapter(4, 8).state_dict()
    ok = adapter_from_payload({"adapter_state_dict": state,
                               "adapter_arch": {"student_dim": 4, "teacher_dim": 8}})
    assert ok is not None and ok.teacher_dim == 8
    with pytest.raises(CheckpointError, match="adapter_arch"):
        adapter_from_payload({"adapter_state_dict": state,
                              "adapter_arch": {"student_dim": 4, "teacher_dim": 10**9}})
