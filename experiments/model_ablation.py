"""Train one VAE alone on the ``photos`` crops and print validation PSNR along the way.

The measurement behind the model design (``docs/models.md``): the same loop, data and loss
for every variant, so variants differ only in what is named on the command line.

    python experiments/model_ablation.py --model tinyvae --steps 1024 --init pca
    python experiments/model_ablation.py --model teacher --free-bits 4 --json out.json

Loss: ``0.3 * MSE + 0.1 * KL`` with ``--free-bits`` nats per latent element on each channel (the
MSE objective the model design was measured with; the trainer's objective in nats is compared
with it in ``experiments/objective.py``); AdamW, linear warm-up then cosine decay to 0 at
``--steps``, gradient clipping at 1.
Validation: the first 512 validation crops (held-out photographs), PSNR over the whole set
(pooled MSE) of ``decode(encode(x))``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hrm_vision.data import PhotoCrops
from hrm_vision.train.loss import gaussian_kl, kl_nats
from hrm_vision.vae import build_model


def pooled_psnr(model: torch.nn.Module, val: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    se, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = val[i:i + batch]
            se += F.mse_loss(model.decode(model.encode(x)), x, reduction="sum").item()
            n += x.numel()
    model.train()
    return float(10 * torch.log10(torch.tensor(n / se)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["teacher", "tinyvae"], default="tinyvae")
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--free-bits", type=float, default=2.0)
    p.add_argument("--init", choices=["pca", "dct", "nolinear"], default="pca",
                   help="pca: init_from_data; dct: the data-free basis; nolinear: the linear "
                        "path zeroed and frozen (nonlinear stages only)")
    p.add_argument("--linear-lr-scale", type=float, default=1.0,
                   help="learning-rate factor of the linear patch path (0: frozen)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="evaluate an exponential moving average of the weights with this decay "
                        "(0: the raw weights)")
    p.add_argument("--logvar-init", type=float, default=None,
                   help="initial bias of the log-variance head (default: the model's)")
    p.add_argument("--arch", type=json.loads, default={}, help="JSON constructor arguments")
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--eval-at", type=int, nargs="*", default=[0, 64, 128, 256, 512, 1024,
                                                              2048, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the curve here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train = PhotoCrops("train").images_uint8[:a.train_samples].float() / 255
    val = PhotoCrops("val").images_uint8[:512].float() / 255
    model = build_model(a.model, **a.arch)
    if a.init == "pca":
        model.init_from_data(train[:4096])
    elif a.init == "nolinear":
        for lin in (model.encoder.linear, model.decoder.linear):
            torch.nn.init.zeros_(lin.weight)
            lin.weight.requires_grad_(False)
    if a.logvar_init is not None:
        with torch.no_grad():
            model.encoder.logvar_head[-1].bias.fill_(a.logvar_init)
    linear = {id(m.weight) for m in (model.encoder.linear, model.decoder.linear)}
    if a.linear_lr_scale == 0:
        for m in (model.encoder.linear, model.decoder.linear):
            m.weight.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [{"params": [q for q in params if id(q) not in linear]},
              {"params": [q for q in params if id(q) in linear], "lr": a.lr * a.linear_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / max(1, a.warmup), total_iters=a.warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, a.steps - a.warmup))],
        milestones=[a.warmup])
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(a.ema), use_buffers=True)
        if a.ema > 0 else None)
    gen = torch.Generator().manual_seed(a.seed)
    curve, start, step = [], time.perf_counter(), 0
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    while True:
        if step in a.eval_at or step == a.steps:
            with torch.no_grad():
                mu, logvar = model.posterior(val[:256])
                kl = gaussian_kl(mu, logvar).mean().item()
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1),
                   "psnr": round(pooled_psnr(model, val), 2), "kl_nats": round(kl, 3)}
            if ema is not None:
                row["ema_psnr"] = round(pooled_psnr(ema.module, val), 2)
            curve.append(row)
            print(json.dumps(row), flush=True)
        if step >= a.steps:
            break
        if pos + a.batch_size > len(train):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos:pos + a.batch_size]]
        pos += a.batch_size
        out = model(x)
        kl = kl_nats(out.mu, out.logvar, a.free_bits, "channel") / out.mu[0].numel()
        loss = 0.3 * (out.reconstruction - x).pow(2).mean() + 0.1 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        if not torch.isfinite(loss):
            print(json.dumps({"step": step, "diverged": True}))
            break
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "params": model.num_parameters(), "curve": curve}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
