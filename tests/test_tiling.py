"""Tiled encode/decode: the full-frame result, memory bounded by the tile, the receptive field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hrm_vision.tiling import (
    CELL,
    ReceptiveField,
    decode_tiled,
    encode_tiled,
    receptive_field,
)
from hrm_vision.vae import MinimalVAE, TeacherVAE
from tests.helpers.models import perturbed

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"student": perturbed(MinimalVAE(latent_dim=8, base_channels=8)),
            "teacher": perturbed(TeacherVAE(latent_dim=16, base_channels=4))}


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, 3, 200, 264)  # 25 x 33 latent cells: tiles do not divide it


@pytest.mark.parametrize("name", ["student", "teacher"])
@pytest.mark.parametrize("tile", [64, 96])
def test_tiles_give_the_full_frame_result(models, frame, name, tile) -> None:
    model = models[name]
    field = receptive_field(model)
    with torch.no_grad():
        z = model.encode(frame)
        full = model.decode(z)
    assert (encode_tiled(model, frame, tile, field) - z).abs().max() <= 1e-5
    assert (decode_tiled(model, z, tile, field) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("part", ["encode", "decode"])
def test_an_overlap_short_of_the_receptive_field_is_not_exact(models, frame, part) -> None:
    """The measured margin is needed: one latent cell less and the tile seams show."""
    model = models["student"]
    field = receptive_field(model)
    short = ReceptiveField(field.encode_px - CELL, field.decode_px - CELL)
    with torch.no_grad():
        z = model.encode(frame)
        if part == "encode":
            err = (encode_tiled(model, frame, 64, short) - z).abs().max()
        else:
            err = (decode_tiled(model, z, 64, short) - model.decode(z)).abs().max()
    assert err > 1e-4


def test_the_model_never_sees_more_than_one_extended_tile(models, frame, monkeypatch) -> None:
    """Peak memory is bounded by the tile: the largest input the model receives is the tile plus
    its margins, whatever the frame size."""
    model = models["student"]
    field = receptive_field(model)
    seen: list[tuple[int, int]] = []
    encode, decode = model.encode, model.decode
    monkeypatch.setattr(model, "encode", lambda x: seen.append(x.shape[-2:]) or encode(x))
    monkeypatch.setattr(model, "decode", lambda z: seen.append(
        tuple(CELL * s for s in z.shape[-2:])) or decode(z))
    big = torch.rand(1, 3, 512, 640)
    encode_tiled(model, big, 64, field)
    decode_tiled(model, encode(big), 64, field)
    bound = 64 + 2 * CELL * max(field.encode_cells, field.decode_cells)
    assert len(seen) > 20
    assert max(max(s) for s in seen) <= bound < 512


def test_receptive_field_of_the_default_models_is_stated_in_the_docs() -> None:
    text = DOCS.read_text()
    for model in (MinimalVAE(), TeacherVAE()):
        field = receptive_field(model)
        name = type(model).__name__
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{name}` |")
                    and "px" in ln)
        assert re.search(rf"\b{field.encode_px} px\b", line), (name, field, line)
        assert re.search(rf"\b{field.decode_px} px\b", line), (name, field, line)


def test_receptive_field_grows_with_depth() -> None:
    student, teacher = receptive_field(MinimalVAE(8, 8)), receptive_field(TeacherVAE(16, 4))
    assert 0 < student.encode_px < teacher.encode_px
    assert 0 < student.decode_px < teacher.decode_px


def test_bad_tile_sizes_are_refused(models, frame) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_tiled(models["student"], frame, 60)
    with pytest.raises(ValueError, match="divisible by 8"):
        encode_tiled(models["student"], frame[..., :100], 64)
