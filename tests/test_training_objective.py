"""Training that trains: early stopping ends a phase that stopped improving (and says so, in
the log and the history, also across a resume); a short run of the student alone keeps both
qualities of its data-fitted start (the mean decode and the decode of a posterior sample) at
the same rate; from a uniform rate allocation the objective raises the sampled decode."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch
from helpers.loops import loop_with_messages  # tests/ is on sys.path (pytest prepend mode)
from torch import Tensor, nn

from hrm_vision.checkpoints import load_model
from hrm_vision.data import validation_images
from hrm_vision.train import Distiller, load_config
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import DistContext, IndexedDataset, make_loader
from hrm_vision.train.trainer import PhaseLoop
from hrm_vision.train.loss import DistillLoss
from hrm_vision.train.trainer import Phase, PhaseContext
from hrm_vision.evaluation.baselines import patch_spectrum
from hrm_vision.evaluation.quality import measure_rate
from hrm_vision.vae import MinimalVAE
from hrm_vision.vae.models import LOGVAR_INIT


class PlateauPhase(Phase):
    """A toy phase whose validation PSNR is given per epoch (``scores``)."""

    name = "toy"
    last_file, best_file = "toy_last.pth", "toy_best.pth"

    def __init__(self, ctx: PhaseContext, epochs: int, scores: list[float]) -> None:
        super().__init__(ctx, epochs)
        self.model, self.scores, self.validated = nn.Linear(12, 3), scores, 0

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        return {"total": (module(x.flatten(1)) - x.mean(dim=(2, 3))).pow(2).mean()}

    def validate(self) -> dict[str, float]:
        self.validated += 1
        return {"psnr": self.scores[self.validated - 1]}

    def model_payload(self) -> dict[str, Any]:
        return {"toy_state_dict": self.model.state_dict()}

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        self.model.load_state_dict(payload["toy_state_dict"])


def plateau_loop(scores: list[float], patience: int | None, folder: str
                 ) -> tuple[PhaseLoop, list[str]]:
    config = DistillConfig(batch_size=4, learning_rate=1e-3, warmup_steps=0, ema_decay=0,
                           early_stop_patience=patience, mixed_precision="off",
                           checkpoint_dir=folder)
    ctx = DistContext()
    data = IndexedDataset(list(torch.rand(8, 3, 2, 2)))
    loader = make_loader(data, 4, shuffle=False, ctx=ctx, seed=0, drop_last=True)
    phase = PlateauPhase(PhaseContext(config, ctx.device, data, data, loader,
                                      reduce=lambda v, n: v), len(scores), scores)
    return loop_with_messages(phase, ctx, loader)


class TestEarlyStopping:
    SCORES = [20.0, 21.0, 20.5, 20.9, 20.2, 25.0, 26.0, 27.0]  # best at epoch 2, then 3 worse

    def test_patience_ends_the_phase_and_says_so(self) -> None:
        loop, messages = plateau_loop(self.SCORES, 3, tempfile.mkdtemp())
        loop.run()
        epochs = [r["epoch"] for r in loop.history]
        assert epochs == [1, 2, 3, 4, 5]  # epochs 3, 4, 5 brought nothing better than 21.0
        assert loop.history[-1].get("early_stop") is True
        assert not any(r.get("early_stop") for r in loop.history[:-1])
        assert any("early stop after epoch 5" in m and "21.00 dB" in m for m in messages)

    def test_no_patience_trains_every_epoch(self) -> None:
        loop, _ = plateau_loop(self.SCORES, None, tempfile.mkdtemp())
        loop.run()
        assert len(loop.history) == len(self.SCORES)
        assert loop.history[-1]["is_best"]

    def test_a_resumed_phase_that_stopped_early_stays_stopped(self) -> None:
        folder = tempfile.mkdtemp()
        loop, _ = plateau_loop(self.SCORES, 3, folder)
        loop.run()
        again, _ = plateau_loop(self.SCORES, 3, folder)
        again.restore(torch.load(f"{folder}/toy_last.pth"), "toy_last.pth")
        again.run()
        assert again.phase.validated == 0 and len(again.history) == 5

    def test_the_default_stops_a_long_run_that_stopped_improving(self) -> None:
        patience = DistillConfig().early_stop_patience
        assert patience is not None and patience < DistillConfig().epochs // 2


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> dict[str, Any]:
    """The student alone from its data-fitted start (0 epochs) and after 3 short epochs."""
    base = {"dataset": "photos", "train_samples": 512, "val_samples": 64, "batch_size": 32,
            "warmup_steps": 5, "distill_latent_weight": 0.0,
            "distill_recon_weight": 0.0, "perceptual_weight": 0.0, "recon_weight": 0.5,
            "device": "cpu", "log_interval": 1000}
    out = {}
    for name, epochs in (("start", 0), ("trained", 3)):
        folder = tmp_path_factory.mktemp(name)
        Distiller(load_config(None, {**base, "epochs": epochs, "checkpoint_dir": str(folder)}),
                  console=False).run()
        out[name] = load_model(folder / "tinyvae_last.pth", role="student")
    out["val"] = validation_images("photos", 64, 32, split="val")
    return out


def test_a_short_run_keeps_both_qualities_of_the_start(short_runs) -> None:
    """48 steps at the default learning rate: neither quality falls (the MSE objective this
    package used before lost 7 dB of the mean decode in 500 such steps)."""
    val = short_runs["val"]
    spectrum = patch_spectrum(val)
    start, trained = (measure_rate(short_runs[k], k, val, "val", spectrum)
                      for k in ("start", "trained"))
    assert trained.psnr_mu_db >= start.psnr_mu_db - 0.3
    assert trained.psnr_sample_db >= start.psnr_sample_db - 0.1
    assert trained.kl_nats_per_element == pytest.approx(start.kl_nats_per_element, rel=0.1)


def test_from_a_uniform_rate_the_objective_raises_the_sampled_decode() -> None:
    """The same rate everywhere (logvar -4 on every channel): 60 steps of the objective move
    the rate to where it buys quality, and the decode of a posterior sample rises."""
    train = validation_images("photos", 256, 32, split="train")
    val = validation_images("photos", 64, 32, split="val")
    spectrum = patch_spectrum(val)
    torch.manual_seed(0)
    model = MinimalVAE(64, 8)
    model.init_from_data(train)
    model.encoder.logvar_head[1].bias.data.fill_(LOGVAR_INIT)
    loss = DistillLoss(recon_weight=0.5, distill_latent_weight=0.0, distill_recon_weight=0.0,
                       perceptual_weight=0.0)
    loss.calibrate(model, train)
    start = measure_rate(model, "start", val, "val", spectrum)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=3e-4)
    for _ in range(60):
        x = train[torch.randint(0, len(train), (32,))]
        total = loss(x, model.train()(x), None, None)["total"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    trained = measure_rate(model, "trained", val, "val", spectrum)
    assert trained.psnr_sample_db > start.psnr_sample_db + 2.0
    assert trained.kl_nats_per_element == pytest.approx(start.kl_nats_per_element, rel=0.15)
