"""8-bit latents: codes on a stored per-channel range."""

import pytest
import torch

from hrm_vision.codes import LEVELS, fit_range, from_8bit, to_8bit


def test_round_trip_error_is_at_most_half_a_step():
    z = torch.randn(16, 8, 5, 7) * torch.linspace(0.1, 30, 8).view(1, 8, 1, 1)
    low, step = fit_range(z)
    q = to_8bit(z, low, step)
    assert q.dtype == torch.uint8 and q.shape == z.shape
    err = (from_8bit(q, low, step) - z).abs().amax(dim=(0, 2, 3))
    assert (err <= step / 2 + 1e-5).all()
    assert q.amin() == 0 and q.amax() == LEVELS


def test_constant_channel_and_clipping():
    z = torch.zeros(4, 2)
    z[:, 1] = torch.arange(4.0)
    low, step = fit_range(z)
    assert step[0] == 1 and torch.equal(from_8bit(to_8bit(z, low, step), low, step), z)
    outside = to_8bit(torch.tensor([[-5.0, 100.0]]), low, step)
    assert outside.tolist() == [[0, LEVELS]]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        fit_range(torch.tensor([[float("nan")]]))
    low, step = fit_range(torch.randn(3, 4))
    with pytest.raises(ValueError, match="low/step"):
        to_8bit(torch.randn(3, 5), low, step)
    with pytest.raises(ValueError, match="uint8"):
        from_8bit(torch.zeros(3, 4), low, step)
