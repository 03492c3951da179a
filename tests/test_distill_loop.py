"""The training loop's arithmetic: gradient accumulation equals a large batch, the learning-rate
schedule at chosen steps (also across a save and restore), bf16 autocast on the CPU."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hrm_vision.checkpoints import model_entry, save_checkpoint
from hrm_vision.distill import Distiller, load_config
from hrm_vision.distill.config import DistillConfig
from hrm_vision.distill.distributed import DistContext, make_loader
from hrm_vision.distill.loop import PhaseLoop
from hrm_vision.distill.optim import autocast, build_scheduler, make_scaler
from hrm_vision.distill.phases import DistillPhase, Phase, PhaseContext
from hrm_vision.distill.splits import IndexedDataset
from hrm_vision.vae import TeacherVAE


class LinearPhase(Phase):
    """A toy phase: a linear map from flattened images to their mean colour, MSE loss."""

    name = "toy"
    last_file, best_file = "toy_last.pth", "toy_best.pth"

    def __init__(self, ctx: PhaseContext, model: nn.Module, epochs: int) -> None:
        super().__init__(ctx, epochs)
        self.model = model

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        target = x.mean(dim=(2, 3))
        total = (module(x.flatten(1)) - target).pow(2).mean()
        return {"total": total}

    def validate(self) -> dict[str, float]:
        return {"psnr": 0.0}

    def model_payload(self) -> dict[str, Any]:
        return {}


def train_toy(images: Tensor, batch_size: int, accum: int, epochs: int = 2) -> tuple[
        nn.Module, PhaseLoop, list[list[Tensor]]]:
    """Train the toy phase; returns the model, the loop and the gradients of every step."""
    config = DistillConfig(batch_size=batch_size, grad_accum_steps=accum, learning_rate=1e-2,
                           warmup_steps=2, grad_clip=None, mixed_precision="off")
    ctx = DistContext()
    data = IndexedDataset(list(images))
    loader = make_loader(data, batch_size, shuffle=True, ctx=ctx, seed=0, drop_last=True)
    torch.manual_seed(0)
    model = nn.Linear(images[0].numel(), 3)
    phase = LinearPhase(PhaseContext(config, ctx.device, data, data, loader,
                                     reduce=lambda v, n: v), model, epochs)
    loop = PhaseLoop(phase, config, ctx, loader, [], lambda *args: None, lambda: None,
                     Path("unused"))
    grads: list[list[Tensor]] = []

    def record(optimizer: Any, args: Any, kwargs: Any) -> None:
        grads.append([p.grad.clone() for p in model.parameters()])

    handle = register_optimizer_step_pre_hook(record)
    try:
        loop.run()
    finally:
        handle.remove()
    return model, loop, grads


class TestGradientAccumulation:
    def test_two_batches_of_4_equal_one_batch_of_8(self) -> None:
        images = torch.rand(16, 3, 4, 4)
        small, small_loop, small_grads = train_toy(images, batch_size=4, accum=2)
        large, large_loop, large_grads = train_toy(images, batch_size=8, accum=1)
        assert small_loop.state.global_step == large_loop.state.global_step == 4
        assert len(small_grads) == len(large_grads) == 4
        for step_a, step_b in zip(small_grads, large_grads, strict=True):
            for a, b in zip(step_a, step_b, strict=True):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
        for a, b in zip(small.parameters(), large.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
        untrained = nn.Linear(48, 3)
        assert not torch.allclose(small.weight, untrained.weight, atol=1e-3)

    def test_a_last_partial_window_still_steps(self) -> None:
        _, loop, _ = train_toy(torch.rand(10, 3, 4, 4), batch_size=2, accum=2, epochs=1)
        assert loop.state.global_step == 3  # batches 1+2, 3+4, 5


class TestSchedule:
    def test_learning_rates_at_chosen_steps(self) -> None:
        lr, warmup, total = 1e-3, 4, 20
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
        sched = build_scheduler(opt, warmup, total)
        rates = []
        for _ in range(total + 1):
            rates.append(opt.param_groups[0]["lr"])  # the rate of this optimizer step
            opt.step()
            sched.step()
        expected = {0: lr / 4, 1: lr / 2, 3: lr, 4: lr, 12: lr / 2,
                    16: lr * (1 + math.cos(math.pi * 12 / 16)) / 2, 20: 0.0}
        for step, value in expected.items():
            assert rates[step] == pytest.approx(value, abs=1e-12), step
        assert all(a <= b for a, b in zip(rates[:4], rates[1:5], strict=True))  # warm-up rises
        assert all(a >= b for a, b in zip(rates[4:20], rates[5:21], strict=True))  # decays

    def test_no_warmup_and_restore(self) -> None:
        lr = 1e-2
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
        sched = build_scheduler(opt, 0, 10)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        for _ in range(3):
            opt.step()
            sched.step()
        opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
        sched2 = build_scheduler(opt2, 0, 10)
        opt2.load_state_dict(opt.state_dict())
        sched2.load_state_dict(sched.state_dict())
        for _ in range(4):
            opt.step()
            sched.step()
            opt2.step()
            sched2.step()
            assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * (1 + math.cos(0.7 * math.pi)) / 2)


class TestPrecision:
    def test_auto_is_off_on_cpu(self) -> None:
        config = DistillConfig(mixed_precision="auto")
        with autocast(config, torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        assert not make_scaler(config, torch.device("cpu")).is_enabled()

    def test_bf16_autocast_on_cpu_trains_and_stays_finite(self, tmp_path, monkeypatch) -> None:
        torch.manual_seed(0)
        teacher = tmp_path / "teacher.pth"
        save_checkpoint(model_entry(TeacherVAE(16, 8, 1), "teacher"), teacher)
        seen: list[tuple[bool, torch.dtype]] = []
        original = DistillPhase.loss

        def spy(self, module, index, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return original(self, module, index, x)

        monkeypatch.setattr(DistillPhase, "loss", spy)
        config = load_config(None, {
            "dataset": "photos", "train_samples": 32, "val_samples": 16, "batch_size": 8,
            "teacher_latent_dim": 16, "teacher_base_channels": 8, "teacher_blocks_per_stage": 1,
            "student_latent_dim": 8, "student_base_channels": 8, "epochs": 1, "device": "cpu",
            "mixed_precision": "bf16", "teacher_checkpoint": str(teacher),
            "checkpoint_dir": str(tmp_path / "ckpt")})
        d = Distiller(config, console=False)
        before = [p.detach().clone() for p in d.student.parameters()]
        d.run()
        assert seen and all(s == (True, torch.bfloat16) for s in seen)
        record = d.history[-1]
        assert record["bad_steps"] == 0
        assert all(math.isfinite(v) for v in (*record["train"].values(),
                                              *record["val"].values()))
        after = list(d.student.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
