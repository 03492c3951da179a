"""Where two distilled students disagree in their teacher's space: the teacher numbers their
latents carry, or the rest, which each adapter predicts from its own photographs.

    python experiments/adapter_tail.py --teacher checkpoints/learn/teacher/teacher.pth \
        --pair checkpoints/entities_corpus/distilled_a/tinyvae_best.pth \
               checkpoints/entities_corpus/distilled_b/tinyvae_best.pth

For the trust report's crops (held-out and unseen, ``hrm_vision.trust.crop_sets`` of the first
student's training config), prints per set: the cosine of the two students' own latents; of
their adapted latents, all teacher numbers and split into the first ``latent_dim`` (the
coordinates a student started in) and the rest; and, for each student, the mean squared error
of its adapter's prediction of the teacher's latent beside predicting the rest by its training
mean (is what the adapter predicts of the rest worth keeping on photographs it did not see?).
Every latent is centred by its training mean, as in the report.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from hrm_vision.io import load, load_checkpoint
from hrm_vision.trust import batched, crop_sets


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
    adapters = [load(path, role="adapter").eval() for path in args.pair]
    k = students[0].latent_dim
    train, sets = crop_sets(load_checkpoint(args.pair[0])["config"], 64, args.num_crops, 4096)
    t_train = batched(teacher.encode, train)
    out = {}
    for name, x in sets.items():
        t = batched(teacher.encode, x) - t_train.mean(0)
        z, a = [], []
        for student, adapter in zip(students, adapters, strict=True):
            z_train = batched(student.encode, train)
            z.append(batched(student.encode, x) - z_train.mean(0))
            a.append(adapter(z[-1] + z_train.mean(0)) - adapter(z_train).mean(0))
        row = {"latents": cosine(*z), "adapted": cosine(*a),
               "adapted_first": cosine(a[0][:, :k], a[1][:, :k]),
               "adapted_rest": cosine(a[0][:, k:], a[1][:, k:])}
        for i, pred in enumerate(a):
            mean_rest = torch.cat([pred[:, :k], torch.zeros_like(pred[:, k:])], dim=1)
            row[f"mse_{'ab'[i]}"] = float((pred - t).pow(2).mean())
            row[f"mse_{'ab'[i]}_rest_as_mean"] = float((mean_rest - t).pow(2).mean())
        out[name] = {key: round(v, 4) for key, v in row.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
