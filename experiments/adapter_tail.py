"""Where two distilled students disagree in their teacher's space: the teacher numbers their
latents carry, or the rest, which each adapter predicts from its own photographs.

    python experiments/adapter_tail.py --teacher checkpoints/learn/teacher/teacher.pth \
        --pair checkpoints/entities_corpus6/distilled_a/tinyvae_best.pth \
               checkpoints/entities_corpus6/distilled_b/tinyvae_best.pth

Each student's adapter is fitted twice on the crops the trainer fits it on (``first_images`` of
the student's training split): by plain least squares, and shrunk to what holds across
photographs (``LatentAdapter.fit`` with ``first_photos``, what training does). For the trust
report's crops (held-out and unseen, ``hrm_vision.trust.crop_sets`` of the first student's
training config), prints per fit and set: the cosine of the two students' adapted latents, all
teacher numbers and split into the first ``latent_dim`` (the coordinates the students started
in) and the rest; and, per student, the mean squared error of its adapter's prediction of the
teacher's latent beside predicting the rest by its training mean (is what the adapter predicts
of the rest worth keeping on photographs it did not see?). Also the cosine of the students' own
latents. Every latent is centred by its training mean, as in the report.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from hrm_vision.io import load, load_checkpoint
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import build_split, first_images, first_photos
from hrm_vision.trust import batched, crop_sets
from hrm_vision.vae import LatentAdapter


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double()).mean())


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--pair", nargs=2, required=True)
    p.add_argument("--num-crops", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(2)
    teacher = load(args.teacher, role="teacher").eval()
    students = [load(path, role="student").eval() for path in args.pair]
    k = students[0].latent_dim
    adapters: dict[str, list[LatentAdapter]] = {"plain": [], "shrunk": []}
    for path, student in zip(args.pair, students, strict=True):
        split = build_split(DistillConfig(**load_checkpoint(path)["config"]), "train")
        x, photos = first_images(split), first_photos(split)
        z, t = batched(student.encode, x), batched(teacher.encode, x)
        for name, groups in (("plain", None), ("shrunk", photos)):
            adapter = LatentAdapter(k, teacher.latent_dim, vector=True)
            adapter.fit(z, t, groups)
            adapters[name].append(adapter)
    train, sets = crop_sets(load_checkpoint(args.pair[0])["config"], 64, args.num_crops, 4096)
    t_train = batched(teacher.encode, train)
    z_train = [batched(s.encode, train) for s in students]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, x in sets.items():
        t = batched(teacher.encode, x) - t_train.mean(0)
        z = [batched(s.encode, x) for s in students]
        out.setdefault("latents", {})[set_name] = round(
            cosine(*(zi - zt.mean(0) for zi, zt in zip(z, z_train, strict=True))), 4)
        for fit, pair in adapters.items():
            a = [ad(zi) - ad(zt).mean(0) for ad, zi, zt in zip(pair, z, z_train, strict=True)]
            row = {"adapted": cosine(*a), "adapted_first": cosine(a[0][:, :k], a[1][:, :k]),
                   "adapted_rest": cosine(a[0][:, k:], a[1][:, k:])}
            for i, pred in enumerate(a):
                rest_as_mean = torch.cat([pred[:, :k], torch.zeros_like(pred[:, k:])], dim=1)
                row[f"mse_{'ab'[i]}"] = float((pred - t).pow(2).mean())
                row[f"mse_{'ab'[i]}_rest_as_mean"] = float((rest_as_mean - t).pow(2).mean())
            out.setdefault(fit, {})[set_name] = {key: round(v, 4) for key, v in row.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
