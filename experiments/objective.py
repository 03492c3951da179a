"""Which objective trains the student: an MSE + KL objective against likelihoods in nats.

The student alone (``MinimalVAE`` data-initialised with ``init_from_data``: at step 0 it is patch
PCA-128), trained on the ``photos`` training crops with the same loop for every objective: AdamW
3e-4, weight decay 1e-4, 50 warm-up steps then cosine decay to 0, batch 64, gradient clipping at
1 (as the package), EMA 0.99 of the weights (evaluated), one thread. Objectives:

``mse``            ``0.3 * MSE + 0.1 * KL``, KL in nats per element with 2 free bits per channel
                   (the trainer's objective before its terms were put in nats).
``sigma-channel``  ``0.3 * NLL + 0.1 * KL`` in nats per image (``hrm_vision.train.loss``): a
                   Gaussian NLL with a learned scalar scale, the KL floored at 2 nats per
                   element on each channel.
``sigma-total``    the same, the floor on the total KL (2 nats x every element).
``lagrange``       ``0.3 * NLL + m * KL``, ``m`` a multiplier holding the KL at 2 nats per element.
``nll-only``       ``0.3 * NLL``, no KL.

``--scale optimal`` replaces the learned scale by the batch's maximum-likelihood one
(``sigma^2 = MSE``, detached). Validation (first 512 validation crops, held-out photographs,
pooled PSNR): decode(mu), decode(z) with z a seeded posterior sample, KL per element, the
Gaussian water-filling bound at that KL (spectrum of the validation crops' 8x8x3 patches) and the
uniform allocation; on a fixed training batch, each term's share of the objective and of the
gradient norm.

    python experiments/objective.py --objectives mse sigma-channel sigma-total lagrange \
        --steps 1500 --out runs/objective
    python experiments/objective.py --table runs/objective     # the Markdown table only
    python experiments/objective.py --references 0.5 1 2 4     # Gaussian references only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hrm_vision import patches
from hrm_vision.data import PhotoCrops
from hrm_vision.metrics import psnr, psnr_from_mse
from hrm_vision.patches import fit_patch_pca
from hrm_vision.train import loss as obj
from hrm_vision.vae import MinimalVAE

OBJECTIVES = ("mse", "sigma-channel", "sigma-total", "lagrange", "nll-only")
RECON_WEIGHT, KL_WEIGHT, FREE_BITS = 0.3, 0.1, 2.0


class Objective:
    """One objective: ``terms(x, out)`` -> the weighted terms (their sum is the loss)."""

    def __init__(self, name: str, scale: str, model: MinimalVAE, calib: torch.Tensor,
                 lagrange_step: float) -> None:
        self.name, self.scale_mode = name, scale
        # the scale starts at the error of the reconstruction the NLL sees in training: the
        # decode of a posterior sample (decode(mu)'s error is ten times smaller at step 0)
        self.scale = obj.GaussianScale()
        with torch.no_grad():
            self.scale.calibrate(model.train()(calib).reconstruction, calib)
        self.target = obj.RateTarget(FREE_BITS, initial=KL_WEIGHT, step_size=lagrange_step)

    def parameters(self) -> list[torch.Tensor]:
        learned = self.name != "mse" and self.scale_mode == "learned"
        return [self.scale.log_sigma] if learned else []

    def log_sigma(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.scale_mode == "optimal":
            return 0.5 * (rec.detach() - x).pow(2).mean().clamp(min=1e-12).log()
        return self.scale.log_sigma

    def terms(self, x: torch.Tensor, out) -> dict[str, torch.Tensor]:
        if self.name == "mse":
            elements = out.mu[0].numel()  # nats per element: the KL per image over its elements
            return {"recon": RECON_WEIGHT * (out.reconstruction - x).pow(2).mean(),
                    "kl": KL_WEIGHT * obj.kl_nats(out.mu, out.logvar, FREE_BITS, "channel")
                    / elements}
        nll = RECON_WEIGHT * obj.gaussian_nll(out.reconstruction, x,
                                              self.log_sigma(out.reconstruction, x))
        if self.name == "nll-only":
            return {"recon": nll}
        if self.name == "lagrange":
            return {"recon": nll, "kl": self.target.multiplier * obj.kl_nats(out.mu, out.logvar)}
        mode = "channel" if self.name == "sigma-channel" else "total"
        return {"recon": nll, "kl": KL_WEIGHT * obj.kl_nats(out.mu, out.logvar, FREE_BITS, mode)}

    def after_step(self, out) -> None:
        if self.name == "lagrange":
            self.target.update(obj.kl_per_element(out.mu.detach(), out.logvar.detach()))


@torch.no_grad()
def validate(model: torch.nn.Module, val: torch.Tensor, spectrum: torch.Tensor,
             seed: int) -> dict[str, float]:
    """decode(mu) and decode(z) PSNR, KL per element and the Gaussian references at that KL."""
    model.eval()
    mu, logvar = model.posterior(val)
    gen = torch.Generator().manual_seed(seed)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen).to(mu)
    kl = obj.kl_per_element(mu, logvar)
    c = mu.shape[1]
    model.train()
    return {"psnr_mu": psnr(model.decode(mu), val), "psnr_z": psnr(model.decode(z), val),
            "kl_nats_per_element": kl, "bits_per_pixel": patches.bits_per_pixel(kl, c),
            "water_filling_db": psnr_from_mse(patches.water_filling(spectrum, kl * c)),
            "uniform_db": psnr_from_mse(patches.uniform_allocation(spectrum, kl, c))}


def shares(model: MinimalVAE, objective: Objective, x: torch.Tensor, seed: int
           ) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    model.train()
    terms = objective.terms(x, model(x))
    params = [*model.parameters(), *objective.parameters()]
    return {"value": {k: float(v) for k, v in terms.items()},
            "value_share": obj.value_shares(terms),
            "gradient_share": obj.gradient_shares(terms, params)}


def run(name: str, a: argparse.Namespace, train: torch.Tensor, val: torch.Tensor,
        spectrum: torch.Tensor, path: Path) -> dict:
    """Train with objective ``name``; the JSON at ``path`` is rewritten at every evaluation
    (``finished`` false until the last step)."""
    torch.manual_seed(a.seed)
    model = MinimalVAE()
    model.init_from_data(train[:4096])
    objective = Objective(name, a.scale, model, train[:512], a.lagrange_step)
    params = [*model.parameters(), *objective.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / a.warmup, total_iters=a.warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, a.steps - a.warmup))],
        milestones=[a.warmup])
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99), use_buffers=True)
    result = {"objective": name, "scale": a.scale,
              "args": {k: str(v) for k, v in vars(a).items()}, "curve": []}
    gen = torch.Generator().manual_seed(a.seed)
    order, pos, start = torch.randperm(len(train), generator=gen), 0, time.time()
    curve = result["curve"]
    fixed = train[:a.batch_size]
    for step in range(a.steps + 1):
        if step in a.eval_at or step == a.steps:
            row = {"step": step, "seconds": round(time.time() - start, 1),
                   **validate(ema.module, val, spectrum, a.seed),
                   "sigma": float(objective.scale.sigma.detach()),
                   "multiplier": float(objective.target.multiplier),
                   **shares(model, objective, fixed, a.seed)}
            curve.append(row)
            print(json.dumps({"objective": name, **row}), flush=True)
            path.write_text(json.dumps({**result, "finished": step == a.steps}, indent=1))
        if step == a.steps:
            break
        if pos + a.batch_size > len(train):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos:pos + a.batch_size]]
        pos += a.batch_size
        out = model(x)
        loss = sum(objective.terms(x, out).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        objective.after_step(out)
        if not math.isfinite(float(loss)):
            curve.append({"step": step, "diverged": True})
            path.write_text(json.dumps({**result, "finished": False}, indent=1))
            break
    return result


def table(folder: Path) -> str:
    """Markdown table of every ``*.json`` run in ``folder``."""
    lines = ["| objective | scale | step | decode(mu) dB | decode(z) dB | KL nats/element | "
             "bits/pixel | water-filling dB | uniform dB | recon share (value / gradient) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        scale = "-" if data["objective"] in ("mse", "package") else data["scale"]
        for r in data["curve"]:
            if "psnr_mu" not in r:
                continue
            lines.append(
                f"| {data['objective']} | {scale} | {r['step']} | {r['psnr_mu']:.2f} | "
                f"{r['psnr_z']:.2f} | {r['kl_nats_per_element']:.2f} | "
                f"{r['bits_per_pixel']:.2f} | {r['water_filling_db']:.2f} | "
                f"{r['uniform_db']:.2f} | {r['value_share']['recon']:.4f} / "
                f"{r['gradient_share']['recon']:.4f} |")
    return "\n".join(lines)


def references(spectrum: torch.Tensor, rates: Sequence[float], channels: int = 128) -> str:
    """Markdown table: the Gaussian references on these patches at each rate (nats/element)."""
    lines = ["| nats per latent element | bits per pixel | water-filling PSNR (dB) | "
             "uniform allocation PSNR (dB) |", "|---|---|---|---|"]
    for r in rates:
        water = patches.water_filling(spectrum, r * channels)
        uniform = patches.uniform_allocation(spectrum, r, channels)
        lines.append(f"| {r:g} | {patches.bits_per_pixel(r, channels):.2f} | "
                     f"{psnr_from_mse(water):.2f} | {psnr_from_mse(uniform):.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES[:4]))
    p.add_argument("--scale", choices=["learned", "optimal"], default="learned")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-at", type=int, nargs="*", default=[0, 500, 1500])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lagrange-step", type=float, default=0.01)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--val-samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/objective"))
    p.add_argument("--table", type=Path, default=None, help="only print this folder's table")
    p.add_argument("--references", type=float, nargs="+", default=None,
                   help="only print the Gaussian references at these rates (nats per element)")
    a = p.parse_args(argv)
    if a.table is not None:
        print(table(a.table))
        return 0
    torch.set_num_threads(a.threads)
    if a.references is not None:
        val = PhotoCrops("val").images_uint8[:a.val_samples].float() / 255
        print(references(fit_patch_pca(val)[2], a.references))
        return 0
    train = PhotoCrops("train").images_uint8[:a.train_samples].float() / 255
    val = PhotoCrops("val").images_uint8[:a.val_samples].float() / 255
    spectrum = fit_patch_pca(val)[2]
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.objectives:
        run(name, a, train, val, spectrum, a.out / f"{name}_{a.scale}.json")
    print(table(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
