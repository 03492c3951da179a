"""Train one compact VAE alone on 64x64 ``photos`` crops; print decode(mu) PSNR beside baselines.

A scratch loop, not the package's trainer (the measurement behind the compact pair in
``docs/models.md``):

    python experiments/compact_train.py --model compact_student --minutes 4 --json s.json
    python experiments/compact_train.py --model compact_teacher --minutes 6 --json t.json
    python experiments/compact_train.py --baselines-only

Data: 8192 training crops (64x64) of the training photographs; two evaluation sets of 512 crops
each: *held-out* (the held-out photographs of ``photos``: coffee, rocket, camera) and *unseen
sources* (a photograph from another collection: matplotlib's bundled ``grace_hopper.jpg``, cut
at the same three scales like the ``photos`` crops). The final table is
:func:`compact_table` of ``training/compact.py`` (the one ``make compact`` prints): the model's
PSNR and rate beside PCA-16/64/256 of whole crops fitted on the first 4096 training crops and 5x5
and 8x8 thumbnails (area down, bicubic up), on the same crops. PSNR over each set (pooled MSE).

Objective (per image, in nats): Gaussian negative log-likelihood of the crop with one learned
scale ``sigma`` (sigma-VAE, Rybkin et al. 2021) and the KL of the posterior to N(0, I) with
free bits on the *total* rate: ``0.3 * NLL + 0.1 * max(KL, free_nats)`` with ``free_nats =
--free-bits x latent_dim``. AdamW, linear warm-up then cosine decay over ``--steps``, gradient
clipping at 1, one torch thread; ``sigma`` starts at the untrained model's RMSE on training crops
and is learned with the weights; the weights evaluated are an exponential moving average
(``--ema``). ``--minutes`` caps the wall time (the schedule still assumes ``--steps``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hrm_vision.compact import CompactVAE
from hrm_vision.data import PhotoCrops
from hrm_vision.vae import build_model

# the table of `make compact`: training/compact.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from compact import (  # noqa: E402
    compact_table,
    decoded_psnr,
    evaluation_sets,
    markdown_table,
    vae_coder,
)

SIZE = 64


def load_data(num_train: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Training crops and the two evaluation sets
    (``evaluation_sets`` of ``training/compact.py``), float in [0, 1]."""
    train = PhotoCrops("train", image_size=SIZE, num_crops=num_train).images_uint8.float() / 255
    held = PhotoCrops("val", image_size=SIZE, num_crops=512).images_uint8.float() / 255
    return train, evaluation_sets(held)


def decode_mu_psnr(model: CompactVAE, x: Tensor) -> float:
    """Pooled PSNR of ``decode(encode(x))`` in eval mode."""
    model.eval()
    return decoded_psnr(model.encode, model.decode, x)


def objective(model: CompactVAE, log_sigma: Tensor, x: Tensor,
              free_nats: float) -> tuple[Tensor, dict[str, float]]:
    """``0.3 * NLL + 0.1 * max(KL, free_nats)``, batch means in nats per image (see the
    module docstring), divided by the pixel count so the learning rate is size-free."""
    mu, logvar = model.posterior(x)
    z = model.reparameterize(mu, logvar)
    rec = model.decode(z)
    d = x[0].numel()
    nll = (0.5 * (x - rec).pow(2).flatten(1).sum(1) * torch.exp(-2 * log_sigma)
           + d * (log_sigma + 0.5 * math.log(2 * math.pi))).mean()
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)).mean()
    loss = (0.3 * nll + 0.1 * torch.clamp(kl, min=free_nats)) / d
    return loss, {"nll": nll.item(), "kl": kl.item(), "sigma": log_sigma.exp().item()}


def train(model: CompactVAE, data: Tensor, evals: dict[str, Tensor], steps: int, lr: float,
          batch: int, free_bits: float, ema_decay: float, minutes: float, eval_every: int,
          seed: int = 0) -> dict[str, object]:
    """Train ``model`` in place with :func:`objective`; returns the PSNR history (EMA weights)
    and the final EMA PSNRs."""
    torch.manual_seed(seed)
    # sigma starts at the untrained model's RMSE on training crops (its maximum-likelihood value)
    start_rmse = 10 ** (-decode_mu_psnr(model, data[:512]) / 20)
    log_sigma = torch.tensor(math.log(start_rmse), requires_grad=True)
    params = [*model.parameters(), log_sigma]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5
                                              * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = copy.deepcopy(model).eval()
    history = [{"step": 0, "seconds": 0.0,
                **{k: decode_mu_psnr(ema, v) for k, v in evals.items()}}]
    print(json.dumps(history[-1]), flush=True)
    start, step = time.perf_counter(), 0
    gen = torch.Generator().manual_seed(seed)
    free_nats = free_bits * model.latent_dim
    while step < steps and time.perf_counter() - start < 60 * minutes:
        model.train()
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        loss, terms = objective(model, log_sigma, x, free_nats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
                e.lerp_(p, 1 - ema_decay) if e.is_floating_point() else e.copy_(p)
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, "seconds": round(time.perf_counter() - start, 1),
                            **terms, **{k: decode_mu_psnr(ema, v) for k, v in evals.items()}})
            print(json.dumps(history[-1]), flush=True)
    final = {k: decode_mu_psnr(ema, v) for k, v in evals.items()}
    model.load_state_dict(ema.state_dict())
    return {"steps_done": step, "seconds": round(time.perf_counter() - start, 1),
            "history": history, "final": final}


def setup_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["compact_student", "compact_teacher"],
                   default="compact_student")
    p.add_argument("--arch", type=json.loads, default={}, help="JSON constructor arguments")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--free-bits", type=float, default=4.0,
                   help="nats per latent element, applied to the total KL")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--num-train", type=int, default=8192)
    p.add_argument("--init", choices=["pca", "dct", "nolinear"], default="pca",
                   help="pca: init_from_data; dct: the data-free basis; nolinear: the linear "
                        "path removed (basis zeroed, nonlinear branches only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def prepare(model: CompactVAE, train_images: Tensor, init: str) -> None:
    """Apply ``--init`` to a fresh model."""
    if init == "pca":
        model.init_from_data(train_images)
    elif init == "nolinear":
        with torch.no_grad():
            for basis in (model.encoder.basis, model.decoder.basis):
                basis.components.zero_()
                basis.mean.fill_(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_args().parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data, evals = load_data(args.num_train)
    result: dict[str, object] = {"args": vars(args)}
    coders = []
    if not args.baselines_only:
        model = build_model(args.model, **args.arch)
        assert isinstance(model, CompactVAE)
        prepare(model, data, args.init)
        result["parameters"] = model.num_parameters()
        result.update(train(model, data, evals, args.steps, args.lr, args.batch_size,
                            args.free_bits, args.ema, args.minutes, args.eval_every, args.seed))
        coders.append(vae_coder(f"{args.model}, {result['steps_done']} steps", model))
    result["table"] = compact_table(coders, evals, data)
    print(markdown_table(result["table"]), flush=True)  # type: ignore[arg-type]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
