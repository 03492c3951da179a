"""What the data-fitted rate allocation of ``init_from_data`` buys an untrained model.

Both models are fitted to the first ``--train`` training crops of ``photos`` (``init_from_data``:
the patch PCA, then the posterior variances of :func:`hrm_vision.vae.patches.allocate_rate`) and
measured on ``--val`` validation crops (held-out photographs) twice: with the allocated
variances and with ``logvar = -4`` on every channel (the same total rate, spread uniformly).
Rows: KL per latent element, decode(mu) and decode(z) PSNR (z a seeded posterior sample, pooled
PSNR) and the Gaussian water-filling bound at the measured rate
(:func:`hrm_vision.evaluation.quality.measure_rate`).

    python experiments/rate_allocation.py              # 2048 training, 512 validation crops
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from hrm_vision.data import validation_images
from hrm_vision.evaluation.baselines import patch_spectrum
from hrm_vision.evaluation.quality import measure_rate
from hrm_vision.vae import MinimalVAE, TeacherVAE
from hrm_vision.vae.models import LOGVAR_INIT


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
            print(f"| {cls.__name__} | {name} | {r.kl_nats_per_element:.2f} | "
                  f"{r.psnr_mu_db:.2f} dB | {r.psnr_sample_db:.2f} dB | "
                  f"{r.water_filling_psnr_db:.2f} dB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
