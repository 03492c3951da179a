"""Codes of latents: 8 bits on a stored per-channel range, and token ids of residual codebooks."""

import pytest
import torch

from hrm_vision.codes import (
    ENTRIES,
    LEVELS,
    Codes,
    fit_codebooks,
    fit_range,
    fit_spread,
    from_8bit,
    from_8bit_binned,
    from_tokens,
    to_8bit,
    to_8bit_binned,
    to_tokens,
)


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


def clustered(n: int = 600, dim: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, dim) * torch.linspace(0.5, 3, dim)


def test_tokens_decode_to_the_latent_shape_and_refine_with_more_ids():
    z = clustered()
    books = fit_codebooks(z, stages=3, iterations=5)
    assert books.shape == (3, ENTRIES, 6)
    tokens = to_tokens(z, books)
    assert tokens.dtype == torch.int64 and tokens.shape == (600, 3)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < ENTRIES
    errors = [float((from_tokens(tokens[:, :k], books) - z).pow(2).mean()) for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < 0.5 * float(z.var(0).sum() / 6)  # one id already beats the mean
    one = fit_codebooks(z, stages=1, iterations=5)
    assert torch.equal(to_tokens(z, one), tokens[:, :1])  # greedy: the first id is a 1-id code


def test_token_inputs_are_checked():
    books = fit_codebooks(clustered(), stages=1, iterations=1)
    with pytest.raises(ValueError, match="at least 512 finite latents"):
        fit_codebooks(torch.randn(100, 4))
    with pytest.raises(ValueError, match="in \\[0, 512\\)"):
        from_tokens(torch.tensor([[512]]), books)
    with pytest.raises(ValueError, match="integer ids"):
        from_tokens(torch.zeros(1, 1), books)
    with pytest.raises(ValueError, match="6 numbers per latent"):
        to_tokens(torch.randn(2, 5), books)


def test_codes_file_round_trip(tmp_path):
    z = clustered()
    codes = Codes(*fit_spread(z), fit_codebooks(z, stages=2, iterations=2))
    (tmp_path / "codes.safetensors").write_bytes(codes.to_bytes())
    back = Codes.load(tmp_path / "codes.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(codes, back, strict=True))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a codes file"):
        Codes.load(tmp_path / "bad.safetensors")


def test_binned_codes_spend_their_levels_where_the_training_latents_are() -> None:
    """Heavy-tailed channels (Student-t, 3 degrees of freedom): equal-probability bins of the
    training distribution code held-out latents with under half the squared error of the
    training min/max range, and a decoded code codes to itself."""
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(0)
    train, held = t.sample((4096, 8)), t.sample((512, 8))
    centre, spread = fit_spread(train)
    q = to_8bit_binned(held, centre, spread)
    assert q.dtype == torch.uint8 and q.shape == held.shape
    binned = (from_8bit_binned(q, centre, spread) - held).pow(2).mean()
    low, step = fit_range(train)
    uniform = (from_8bit(to_8bit(held, low, step), low, step) - held).pow(2).mean()
    assert binned < uniform / 2
    assert torch.equal(to_8bit_binned(from_8bit_binned(q, centre, spread), centre, spread), q)


def test_binned_codes_refuse_bad_statistics() -> None:
    centre, spread = fit_spread(torch.randn(16, 4))
    with pytest.raises(ValueError, match="centre/spread"):
        to_8bit_binned(torch.randn(3, 5), centre, spread)
    with pytest.raises(ValueError, match="uint8"):
        from_8bit_binned(torch.zeros(3, 4), centre, spread)
    with pytest.raises(ValueError, match="two latents"):
        fit_spread(torch.randn(1, 4))
