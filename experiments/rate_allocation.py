"""What the water-filling start of ``init_from_data`` buys an untrained model at its budget.

Both models are fitted to the first ``--train`` training crops of ``photos`` at ``--bpp`` bits
per pixel (``init_from_data``: the patch PCA made the reverse water-filling code of that rate,
posterior variance ``s^2 = min(1, theta / lambda)`` per component and both linear maps scaled by
``sqrt(1 - s^2)``), then measured on ``--val`` validation crops (held-out photographs) three ways
at the same KL on the training crops: as fitted; with the components' means kept whole and the
variances allocated where the linear decoder needs them
(:func:`hrm_vision.patches.allocate_rate`, the start before the budget was set this way); and
with whole means and one variance for every channel. Rows: KL per latent element and bits per
pixel on the validation crops, decode(mu) and decode(z) PSNR (z a seeded posterior sample, pooled
PSNR) and the Gaussian water-filling bound at the measured rate
(:func:`hrm_vision.evaluate.measure_rate`).

    python experiments/rate_allocation.py              # 2048 training, 512 validation crops
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch

from hrm_vision import patches
from hrm_vision.data import validation_images
from hrm_vision.evaluate import measure_rate, patch_spectrum
from hrm_vision.vae import MinimalVAE, TeacherVAE


def row(model: str, name: str, r) -> str:  # noqa: ANN001
    return (f"| {model} | {name} | {r.kl_nats_per_element:.3f} | {r.bits_per_pixel:.2f} | "
            f"{r.psnr_mu_db:.2f} dB | {r.psnr_sample_db:.2f} dB | "
            f"{r.water_filling_psnr_db:.2f} dB |")


@torch.no_grad()
def whole_means(model: MinimalVAE | TeacherVAE, train: torch.Tensor, nats: float,
                uniform: bool) -> None:
    """Undo the fitted code's shrinking (each channel keeps its whitened coefficient) and spend
    ``nats`` per 8x8 patch on the training crops with variances allocated by decoder gain, or
    (``uniform``) the same variance on every channel."""
    eye = torch.eye(model.latent_dim, model.encoder.patches.dim)
    model.encoder.linear.weight.copy_(eye[:, :, None, None])
    model.decoder.linear.weight.copy_(eye.T[:, :, None, None])
    enc_w, enc_b, dec_w, _ = model.linear_path()
    mu = patches.patch_vectors(train).double() @ enc_w.double().T + enc_b.double()
    gains = torch.ones(model.latent_dim) if uniform else dec_w.double().pow(2).sum(0)
    var = patches.allocate_rate(gains, mu.pow(2).mean(0), nats)
    model.encoder.logvar_head[1].bias.copy_(var.log())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2048)
    p.add_argument("--val", type=int, default=512)
    p.add_argument("--bpp", type=float, default=6.0, help="the budget (bits per pixel)")
    a = p.parse_args(argv)
    train = validation_images("photos", a.train, 32, split="train")
    val = validation_images("photos", a.val, 32, split="val")
    spectrum = patch_spectrum(val)
    nats = a.bpp * patches.PIXELS_PER_CELL * math.log(2)
    print("| model | start | KL nats/element | bits/pixel | decode(mu) | decode(z) | "
          "water-filling |")
    print("|---|---|---|---|---|---|---|")
    for cls in (MinimalVAE, TeacherVAE):
        for name in ("water-filling code (the default)", "whole means, allocated",
                     "whole means, one variance"):
            model = cls().eval()
            model.init_from_data(train, bits_per_pixel=a.bpp)
            if name != "water-filling code (the default)":
                whole_means(model, train, nats, uniform=name.endswith("one variance"))
            print(row(cls.__name__, name, measure_rate(model, cls.__name__, val, "val",
                                                       spectrum)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
