"""What the data-fitted rate allocation of ``init_from_data`` buys an untrained model.

Both models are fitted to the first ``--train`` training crops of ``photos`` (``init_from_data``:
the patch PCA, then the posterior variances of :func:`hrm_vision.patches.allocate_rate`) and
measured on ``--val`` validation crops (held-out photographs) three times: with the allocated
variances; with ``logvar = -4`` on every channel (the same total rate, spread uniformly); and
as the reverse water-filling code itself at the allocated code's KL (posterior variance
``s^2 = min(1, theta / lambda)`` per component, the encoder's and decoder's linear maps scaled
by ``sqrt(1 - s^2)``, so the posteriors average to the prior and the KL is the mutual
information): the code the water-filling bound describes, which the default does not use
because it gives up the mean decode (decode(mu) error ``lambda s^4`` instead of 0 per kept
component). The last one is measured for the student only (the teacher's latent holds
two or three copies of each component).
Rows: KL per latent element, decode(mu) and decode(z) PSNR (z a seeded posterior sample, pooled
PSNR) and the Gaussian water-filling bound at the measured rate
(:func:`hrm_vision.evaluate.measure_rate`).

    python experiments/rate_allocation.py              # 2048 training, 512 validation crops
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from hrm_vision import patches
from hrm_vision.data import validation_images
from hrm_vision.evaluate import measure_rate, patch_spectrum
from hrm_vision.vae import LOGVAR_INIT, MinimalVAE, TeacherVAE


def row(model: str, name: str, r) -> str:  # noqa: ANN001
    return (f"| {model} | {name} | {r.kl_nats_per_element:.2f} | {r.psnr_mu_db:.2f} dB | "
            f"{r.psnr_sample_db:.2f} dB | {r.water_filling_psnr_db:.2f} dB |")


@torch.no_grad()
def water_filling_code(model: MinimalVAE | TeacherVAE, total_nats: float) -> None:
    """Turn the fitted linear path into the reverse water-filling code of ``total_nats`` per
    8x8 patch over its latent channels (each channel's component has the decoder gain
    ``lambda``, its squared column norm)."""
    _, _, dec_w, _ = model.linear_path()
    gains = dec_w.double().pow(2).sum(0)
    theta = patches.water_level(gains, total_nats)
    var = (theta / gains.clamp(min=1e-30)).clamp(max=1.0)
    a = (1 - var).clamp(min=0).sqrt().float()
    model.encoder.linear.weight.mul_(a.view(-1, 1, 1, 1))
    model.decoder.linear.weight.mul_(a.view(1, -1, 1, 1))
    model.encoder.logvar_head[1].bias.copy_(var.clamp(min=1e-12).log().float())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2048)
    p.add_argument("--val", type=int, default=512)
    a = p.parse_args(argv)
    train = validation_images("photos", a.train, 32, split="train")
    val = validation_images("photos", a.val, 32, split="val")
    spectrum = patch_spectrum(val)
    print("| model | variances | KL nats/element | decode(mu) | decode(z) | water-filling |")
    print("|---|---|---|---|---|---|")
    for cls in (MinimalVAE, TeacherVAE):
        model = cls().eval()
        model.init_from_data(train)
        allocated = model.encoder.logvar_head[1].bias.detach().clone()
        for name, bias in (("allocated", allocated),
                           ("uniform -4", torch.full_like(allocated, LOGVAR_INIT))):
            model.encoder.logvar_head[1].bias.data.copy_(bias)
            r = measure_rate(model, cls.__name__, val, "val", spectrum)
            print(row(cls.__name__, name, r))
            if name == "allocated":
                total = r.kl_nats_per_element * model.latent_dim
        if cls is MinimalVAE:  # one copy per component (the teacher holds copies)
            water_filling_code(model, total)
            print(row(cls.__name__, "water-filling code",
                      measure_rate(model, cls.__name__, val, "val", spectrum)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
