"""The training loop's arithmetic: gradient accumulation equals a large batch, the learning-rate
schedule at chosen steps (also across a save and restore), bf16 autocast on the CPU; bad steps:
an optimizer step that leaves non-finite weights or optimizer state is undone exactly (as if
its batch had been skipped), and an epoch without a good step is an error."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import pytest
import torch
from helpers.loops import loop_with_messages  # tests/ is on sys.path (pytest prepend mode)
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from hrm_vision.checkpoints import model_entry, save_checkpoint
from hrm_vision.train import Distiller, load_config
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import DistContext, IndexedDataset, make_loader
from hrm_vision.train.trainer import PhaseLoop, TrainingDiverged
from hrm_vision.train.trainer import autocast, build_scheduler, make_scaler
from hrm_vision.train.trainer import DistillPhase, Phase, PhaseContext
from hrm_vision.train.trainer import LastGoodState
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
                           warmup_steps=2, grad_clip=None, mixed_precision="off",
                           checkpoint_dir=tempfile.mkdtemp())
    ctx = DistContext()
    data = IndexedDataset(list(images))
    loader = make_loader(data, batch_size, shuffle=True, ctx=ctx, seed=0, drop_last=True)
    torch.manual_seed(0)
    model = nn.Linear(images[0].numel(), 3)
    phase = LinearPhase(PhaseContext(config, ctx.device, data, data, loader,
                                     reduce=lambda v, n: v), model, epochs)
    loop = PhaseLoop(phase, ctx=ctx, loader=loader, history=[], emit=lambda *args: None,
                     stop_signal=lambda: None)
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


class NaNLossPhase(LinearPhase):
    """The toy phase whose training loss is NaN on the calls (counted from 0) in ``nan_calls``."""

    def __init__(self, *args: Any, nan_calls: set[int]) -> None:
        super().__init__(*args)
        self.nan_calls, self.calls = nan_calls, 0

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        terms = super().loss(module, index, x)
        self.calls += 1
        if self.calls - 1 in self.nan_calls:
            terms = {"total": terms["total"] * float("nan")}
        return terms


def toy_loop(images: Tensor, epochs: int = 2, nan_calls: set[int] = frozenset(),
             max_bad_steps: int = 10) -> tuple[nn.Module, PhaseLoop, list[str]]:
    """A toy loop (batch 4, EMA on, 16 images: 4 steps per epoch) and its messages."""
    config = DistillConfig(batch_size=4, learning_rate=1e-2, warmup_steps=2, grad_clip=1.0,
                           mixed_precision="off", ema_decay=0.9, max_bad_steps=max_bad_steps,
                           checkpoint_dir=tempfile.mkdtemp())
    ctx = DistContext()
    data = IndexedDataset(list(images))
    loader = make_loader(data, 4, shuffle=True, ctx=ctx, seed=0, drop_last=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(images[0].numel(), 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    phase = NaNLossPhase(PhaseContext(config, ctx.device, data, data, loader,
                                      reduce=lambda v, n: v), model, epochs, nan_calls=nan_calls)
    loop, messages = loop_with_messages(phase, ctx, loader)
    return model, loop, messages


def poison_steps(steps: set[int], what: str) -> Any:
    """An optimizer post-step hook making the ``steps``-th optimizer steps (from 0) leave a NaN
    in a weight (``what="weight"``) or an infinity in AdamW's second moment (``"state"``)."""
    count = iter(range(10**6))

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if next(count) in steps:
            p = optimizer.param_groups[0]["params"][0]
            if what == "weight":
                p.data.view(-1)[0] = float("nan")
            else:
                optimizer.state[p]["exp_avg_sq"].view(-1)[0] = float("inf")

    return register_optimizer_step_post_hook(hook)


def snapshot(model: nn.Module, loop: PhaseLoop) -> dict[str, Tensor]:
    """Weights, averaged weights and optimizer state of a toy loop, flattened by name."""
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"average.{k}": v.clone()
                for k, v in loop.average.averaged.module.state_dict().items()})
    for i, state in loop.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    return out


class TestNonFiniteSteps:
    @pytest.mark.parametrize("what", ["weight", "state"])
    @pytest.mark.parametrize("step", [0, 5])
    def test_an_undone_step_equals_a_skipped_batch(self, what: str, step: int) -> None:
        """A step that leaves a NaN weight (or an infinite optimizer moment) is undone: the run
        ends bit-identical to one whose same batch had a NaN loss (weights, weight average,
        optimizer state, schedule), so nothing of the bad step reaches the average. Step 0 is
        the first step, which creates AdamW's state (undone: the state is dropped again)."""
        images = torch.rand(16, 3, 4, 4)
        model, loop, messages = toy_loop(images)
        handle = poison_steps({step}, what)
        try:
            loop.run()
        finally:
            handle.remove()
        ref_model, ref_loop, _ = toy_loop(images, nan_calls={step})
        ref_loop.run()
        assert loop.state.bad_steps == ref_loop.state.bad_steps == 1
        assert loop.state.global_step == ref_loop.state.global_step == 7
        assert loop.scheduler.last_epoch == ref_loop.scheduler.last_epoch == 7
        assert loop.history[-1]["bad_steps"] == 1
        assert [m for m in messages if "non-finite" in m] == [
            f"[toy] non-finite weights after the optimizer step at epoch {step // 4 + 1} batch "
            f"{step % 4}: step undone (1 in a row)"]
        got, ref = snapshot(model, loop), snapshot(ref_model, ref_loop)
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(got[key], value), key
        assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
        untouched, _, _ = toy_loop(images)
        untouched.train()
        assert not torch.equal(untouched[0].weight, model[0].weight)  # it did train

    def test_bad_steps_in_a_row_stop_the_run(self) -> None:
        images = torch.rand(16, 3, 4, 4)
        model, loop, _ = toy_loop(images, max_bad_steps=3)
        handle = poison_steps(set(range(5, 100)), "weight")
        try:
            with pytest.raises(TrainingDiverged, match=r"the weights became non-finite 3 times "
                               r"in a row \(epoch 2, batch 3\); stopped. The last good "
                               r"checkpoint is .*toy_last"):
                loop.run()
        finally:
            handle.remove()
        assert loop.state.global_step == 5 and loop.state.bad_steps == 3
        assert all(torch.isfinite(p).all() for p in model.parameters())

    def test_mixed_bad_steps_are_named_both(self) -> None:
        model, loop, _ = toy_loop(torch.rand(16, 3, 4, 4), max_bad_steps=2, nan_calls={2})
        handle = poison_steps({2}, "weight")  # loss call 3 is the third optimizer step
        try:
            with pytest.raises(TrainingDiverged, match="the loss or the weights were non-finite "
                               "2 times in a row"):
                loop.run()
        finally:
            handle.remove()

    def test_an_epoch_without_a_good_step_is_an_error(self) -> None:
        """Every batch of epoch 2 is bad, fewer than ``max_bad_steps``: no KeyError, a clear
        error before the epoch is recorded or saved."""
        model, loop, _ = toy_loop(torch.rand(16, 3, 4, 4), nan_calls={4, 5, 6, 7})
        with pytest.raises(TrainingDiverged, match="epoch 2 of the toy phase kept no optimizer "
                           r"step \(4 bad steps so far"):
            loop.run()
        assert [r["epoch"] for r in loop.history] == [1]

    def test_last_good_state_restores_what_it_saved(self) -> None:
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        good = LastGoodState(model, opt)
        good.save()  # before the first step: no optimizer state yet
        model(torch.rand(8, 4)).sum().backward()
        opt.step()
        assert good.all_finite() and len(opt.state) == 4  # two weights, two biases
        before = {k: v.clone() for k, v in model.state_dict().items()}
        good.restore()
        assert len(opt.state) == 0
        assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
        good.save()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model[1].running_var.fill_(float("inf"))
        assert not good.all_finite()
        good.restore()
        assert good.all_finite()
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), k


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
