"""Why the teacher uses BatchNorm with zero-initialised residual blocks: a short ablation.

Trains three versions of the default ``TeacherVAE`` for the same few steps on ``photos`` (plain
MSE, no sampling) and prints validation PSNR: as built (BatchNorm, zero-init blocks), BatchNorm
with ordinary init, and every BatchNorm replaced by GroupNorm (the first teacher's choice).

    python -m experiments.teacher_norm_ablation --steps 150
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from hrm_vision.data.photos import PhotoCrops
from hrm_vision.metrics import psnr
from hrm_vision.vae import TeacherVAE
from hrm_vision.vae.blocks import ResBlock


def ordinary_init(model: TeacherVAE) -> TeacherVAE:
    for block in model.modules():
        if isinstance(block, ResBlock):
            nn.init.ones_(block.body[-1].weight)
    return model


def group_norm(model: TeacherVAE) -> TeacherVAE:
    ordinary_init(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                c = child.num_features
                setattr(parent, name, nn.GroupNorm(math.gcd(32, c), c))
    return model


def main(argv: list[str] | None = None) -> int:
    """Train the three variants and print their validation PSNR."""
    parser = argparse.ArgumentParser(prog="python -m experiments.teacher_norm_ablation",
                                     description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train = PhotoCrops("train", num_crops=4096).images_uint8
    val = PhotoCrops("val", num_crops=256).images_uint8.float() / 255
    variants = {"BatchNorm, zero-init blocks (default)": lambda m: m,
                "BatchNorm, ordinary init": ordinary_init,
                "GroupNorm, ordinary init": group_norm}
    for name, make in variants.items():
        torch.manual_seed(0)
        model = make(TeacherVAE()).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            x = train[torch.randint(0, len(train), (args.batch_size,), generator=gen)].float() / 255
            loss = ((model(x, sample=False).reconstruction - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            print(f"{name}: val PSNR {psnr(model(val).reconstruction, val):.2f} dB "
                  f"after {args.steps} steps of {args.batch_size}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
