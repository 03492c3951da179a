"""The weight average: what it averages, when it is applied, and what a checkpoint carries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hrm_vision.train.trainer import WeightAverage


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))


def train_steps(model: nn.Module, average: WeightAverage, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        average.update()


def test_first_update_copies_then_averages() -> None:
    model = net()
    avg = WeightAverage(model, 0.9)
    train_steps(model, avg, 1)
    w = model[0].weight.detach().clone()
    assert torch.equal(avg.averaged.module[0].weight, w)
    train_steps(model, avg, 1)
    expected = 0.9 * w + 0.1 * model[0].weight.detach()
    assert torch.allclose(avg.averaged.module[0].weight, expected, atol=1e-6)


def test_applied_swaps_in_and_restores_raw_weights() -> None:
    model = net()
    avg = WeightAverage(model, 0.9)
    train_steps(model, avg, 5)
    raw = model[0].weight.detach().clone()
    with avg.applied():
        assert torch.equal(model[0].weight, avg.averaged.module[0].weight)
        assert not torch.equal(model[0].weight, raw)
    assert torch.equal(model[0].weight, raw)


def test_restore_continues_exactly() -> None:
    a = net()
    avg_a = WeightAverage(a, 0.9)
    train_steps(a, avg_a, 3)
    with avg_a.applied():
        averaged = {k: v.clone() for k, v in a.state_dict().items()}
    payload = avg_a.train_payload()
    b = net()
    b.load_state_dict(averaged)  # what a checkpoint's model entry holds
    avg_b = WeightAverage(b, 0.9)
    avg_b.restore(payload)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert avg_b.averaged.n_averaged.item() == avg_a.averaged.n_averaged.item() == 3
    assert torch.equal(avg_b.averaged.module[0].weight, avg_a.averaged.module[0].weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_must_be_inside_the_unit_interval(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net(), decay)
