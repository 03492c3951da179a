"""``hrm-vision trust CHECKPOINT --out DIR``: what a compact student's code of a 64x64 crop can be
trusted with, into ``trust.json`` (figures in docs/irp.md, "The trust report"), ``trust.md`` and
``codes.safetensors`` (for the plugin's ``codes`` setting). Held-out figures at the top level, the
same for unseen-source crops under ``unseen``; images are float ``(N, 3, S, S)`` in [0, 1].
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import codes as coding
from ._extras import require
from .compact import CompactVAE, fit_crop_pca
from .data import VAL_PHOTOS, crop_images, load_photo
from .evaluate import CROP_PCA_FIT, thumbnail
from .export import cover
from .io import atomic_write, load, load_checkpoint, write_json, write_text
from .irp.sage import sage_trust
from .metrics import gaussian_kl, psnr, ssim

UNSEEN_PHOTO = "grace_hopper.jpg"  #: the unseen-sources photograph (bundled with matplotlib)
CHANGES = ("shift", "scale", "brightness", "pan")  #: the view changes of :func:`view_pairs`
Fn = Callable[[Tensor], Tensor]


def unseen_photo() -> np.ndarray:
    """:data:`UNSEEN_PHOTO`, ``(H, W, 3)`` uint8 RGB, a photograph ``photos`` does not hold."""
    cbook = require("matplotlib.cbook", extra="train", purpose="the unseen-sources crops")
    with cbook.get_sample_data(UNSEEN_PHOTO) as f:
        return np.asarray(require("PIL.Image", extra="photos").open(f).convert("RGB"))


def unseen_crops(num: int, image_size: int = 64, seed: int = 7) -> Tensor:
    """``num`` crops ``(num, 3, S, S)`` in [0, 1] of :data:`UNSEEN_PHOTO`, cut like ``photos``."""
    return crop_images([unseen_photo()], num, image_size, seed, label=UNSEEN_PHOTO).float() / 255


def view_pairs(photos: Sequence[np.ndarray], change: str, count: int, size: int = 64,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` pairs of crops ``(count, 3, size, size)`` of one scene under ``change``:
    ``shift`` 2-8 px in one of 8 directions, ``scale`` +-10%, ``brightness`` +-10%, ``pan`` two
    frames of a 1.5x-wider window moving 6 px across the photograph, each resized to ``size``."""
    if change not in CHANGES:
        raise ValueError(f"change must be one of {CHANGES}, got {change!r}")
    rng = np.random.default_rng(seed)
    regions = crop_images(photos, count, 2 * size, seed).float() / 255
    c, pairs = size // 2, []
    for r in regions:
        sign = int(rng.choice((-1, 1)))
        centre = r[:, c:c + size, c:c + size]
        if change == "shift":
            d, (dy, dx) = int(rng.integers(2, 9)), [(y, x) for y in (-1, 0, 1) for x in (-1, 0, 1)
                                                    if y or x][rng.integers(8)]
            pair = centre, r[:, c + d * dy:c + d * dy + size, c + d * dx:c + d * dx + size]
        elif change == "scale":
            w = round(size * (1 + 0.1 * sign))
            o = size - w // 2
            pair = centre, cover(r[None, :, o:o + w, o:o + w], size, size)
        elif change == "brightness":
            pair = centre, (centre * (1 + 0.1 * sign)).clamp(0, 1)
        else:
            w, o = 3 * size // 2, size // 4
            pair = tuple(cover(r[None, :, o:o + w, o + x:o + x + w], size, size)
                         for x in (0, 6 * sign))
        pairs.append(pair)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def agreement(za: Tensor, zb: Tensor, centre: Tensor) -> tuple[float, float]:
    """``(mean cosine of the pairs, retrieval@1)`` of latents ``(N, D)`` centred by ``centre``:
    retrieval@1 is the share of ``za[i]`` whose most similar of all ``zb`` is ``zb[i]``."""
    a, b = (F.normalize((z - centre).double(), dim=1) for z in (za, zb))
    sim = a @ b.T
    hits = sim.argmax(1) == torch.arange(len(a))
    return float(sim.diagonal().mean()), float(hits.double().mean())


def decoder_gain(decode: Fn, z: Tensor) -> Tensor:
    """``(D,)``: for each number of the latents ``z`` ``(N, D)``, the RMS over ``z`` of the norm
    of ``decode``'s derivative along it (what a unit step of that number changes in the image)."""
    def gain(i: int) -> Tensor:
        step = torch.zeros_like(z).index_fill_(1, torch.tensor([i]), 1.0)
        return torch.func.jvp(decode, (z,), (step,))[1].flatten(1).square().sum(1).mean().sqrt()
    return torch.stack([gain(i) for i in range(z.shape[1])]).detach()


@torch.no_grad()
def batched(fn: Fn, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def quality(rec: Tensor, x: Tensor) -> dict[str, float]:
    return {"psnr": psnr(rec, x), "ssim": ssim(rec, x)}


def load_student(path: str) -> tuple[CompactVAE, dict[str, Any] | None]:
    """A compact student and the training config its ``.pth`` file holds (None otherwise)."""
    model = load(path, role="student")
    config = None if path.endswith(".safetensors") else load_checkpoint(path).get("config")
    if not isinstance(model, CompactVAE) or model.in_channels != 3:
        raise ValueError(f"{path}: the trust report reads an RGB compact student, got a "
                         f"{type(model).__name__}")
    return model.eval(), config


def crop_sets(config: dict[str, Any] | None, size: int, num: int, num_train: int
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Training crops and ``{"held_out", "unseen"}``, ``num`` each: the splits of the
    checkpoint's training config, else of the ``photos`` dataset."""
    from .train.config import DistillConfig
    from .train.trainer import build_split, first_images

    values = config or {"dataset": "photos", "image_size": size}
    cfg = DistillConfig(**{**values, "train_samples": num_train, "val_samples": num})
    train, held = (first_images(build_split(cfg, s), n)
                   for s, n in (("train", num_train), ("val", num)))
    return train, {"held_out": held, "unseen": unseen_crops(len(held), size)}


def device_agreement(model: CompactVAE, sets: dict[str, Tensor], train: Tensor,
                     centre: Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """``{precision: {set: figures}}`` of the fp32/fp16/int8 ONNX graphs (int8 calibrated on
    ``train``) against eager fp32, latents and decoded crops (docs/irp.md, "The trust report")."""
    from .export import export_model, onnx_runner

    out: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_model(model, Path(tmp) / "graphs", sets["held_out"][:8],
                              precisions=("fp32", "fp16", "int8"),
                              calibration=train[:256]).precision_files
        for precision, pair in graphs.items():
            enc, dec = (onnx_runner(pair[p]) for p in ("encoder", "decoder"))
            for key, x in sets.items():
                z, ref = enc(x), batched(model.encode, x)
                rec, rec_ref = dec(z), batched(model.decode, ref)
                steps = ((rec.clamp(0, 1) - rec_ref.clamp(0, 1)).abs() * 255).round()
                cosine = F.cosine_similarity((z - centre).double(), (ref - centre).double())
                out.setdefault(precision, {})[key] = {
                    "cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
                    "max_abs": float((z - ref).abs().max()),
                    "decoded_psnr_db": psnr(rec, rec_ref.clamp(0, 1)),
                    "decoded_max_abs": float(steps.max() / 255),
                    "decoded_differ": float((steps > 1).flatten(1).any(1).double().mean())}
    return out


def entity_agreement(paths: Sequence[str], sets: dict[str, Tensor], train: Tensor,
                     teacher_space: bool) -> dict[str, float]:
    """``{set: mean cosine}`` between two students' latents of the same crops, each centred by
    its training mean: through each adapter (the teacher's space) or as they are."""
    codes = []
    for path in paths:
        student = load(path, role="student")
        adapter = load(path, role="adapter").eval() if teacher_space else None
        fn = student.encode if adapter is None else (lambda x, s=student, a=adapter: a(s.encode(x)))
        centre = batched(fn, train).mean(0)
        codes.append({k: batched(fn, x) - centre for k, x in sets.items()})
    a, b = codes
    return {k: float(F.cosine_similarity(a[k].double(), b[k].double()).mean()) for k in a}


@torch.no_grad()
def trust_report(args: argparse.Namespace) -> tuple[dict[str, Any], coding.Codes]:
    """The report (see the module docstring) and the fitted codes."""
    start = time.perf_counter()
    model, config = load_student(args.checkpoint)
    size = model.image_size
    train, sets = crop_sets(config, size, args.num_crops, args.train_crops)
    z_train = batched(model.encode, train)
    centre = z_train.mean(0)
    mean, comps, std = fit_crop_pca(train[:CROP_PCA_FIT], 64)
    gain = decoder_gain(model.decode, z_train[:256])

    def pca(k: int) -> tuple[Fn, Fn]:
        return ((lambda x: (x.flatten(1) - mean) @ comps[:k].T),
                (lambda c: (mean + c @ comps[:k]).reshape(-1, 3, size, size)))

    centre8, spread8 = coding.fit_spread(z_train)
    books = coding.fit_codebooks(z_train, args.token_ids)
    views = {"held_out": [load_photo(p) for p in VAL_PHOTOS], "unseen": [unseen_photo()]}
    figures: dict[str, dict[str, Any]] = {}
    for key, x in sets.items():
        mu, logvar = model.posterior(x)
        dec = batched(model.decode, mu)
        (pca64, back64), (pca16, back16) = pca(64), pca(16)
        q = {"student": quality(dec, x), "pca64": quality(back64(pca64(x)), x),
             "thumbnail8": quality(thumbnail(x, 8), x)}
        kl = float(gaussian_kl(mu, logvar).mean())
        binned = coding.to_8bit_binned(mu, centre8, spread8)
        eight = psnr(batched(model.decode, coding.from_8bit_binned(binned, centre8, spread8)), x)
        ids = coding.to_tokens(mu, books)
        tokens = {str(k): quality(batched(model.decode, coding.from_tokens(ids[:, :k], books)), x)
                  for k in sorted({1, len(books)})}  # SSIM is slow: one id and all
        view: dict[str, dict[str, float]] = {}
        coders = (("student", "student", lambda z: z, centre), ("pca64", "pca64", lambda z: z, 0),
                  ("pca64_whitened", "pca64", lambda z: z / std, 0.0),  # the student's scale
                  ("student_decoder_units", "student", lambda z: z * gain, centre * gain))  # PCA's
        for i, change in enumerate(CHANGES):
            a, b = view_pairs(views[key], change, args.gallery + 1, size, seed=i)
            codes = {name: (batched(fn, a), batched(fn, b))
                     for name, fn in (("student", model.encode), ("pca64", pca64))}
            for name, code, rescale, c in coders:
                cos, hit = agreement(rescale(codes[code][0]), rescale(codes[code][1]), c)
                view.setdefault(change, {}).update({name: hit, f"cosine_{name}": cos})
        figures[key] = {
            "psnr": {k: v["psnr"] for k, v in q.items()},
            "ssim": {k: v["ssim"] for k, v in q.items()},
            "sage_trust": {"student": sage_trust(F.mse_loss(dec.clamp(0, 1), x).item(), kl),
                           "kl_per_dimension": kl},
            "latent_8bit_cost_db": q["student"]["psnr"] - eight,
            "tokens": {**tokens[str(len(books))], "ids_per_crop": len(books),
                       "bits_per_crop": len(books) * math.log2(books.shape[1]), "by_ids": tokens,
                       "pca16": quality(back16(pca16(x)), x)},
            "view_agreement": view}
    device = None if args.no_device else device_agreement(model, sets, train, centre)
    pairs = {"distilled": (args.distilled_pair, True), "alone": (args.alone_pair, False)}
    entity = {k: entity_agreement(p, sets, train, ts) if p else None
              for k, (p, ts) in pairs.items()}
    for key, f in figures.items():
        f["device_agreement"] = {p: (device or {}).get(p, {}).get(key, {"cosine": None,
                                                                        "max_abs": None})
                                 for p in ("fp16", "int8", "fp32")}
        f["entity_agreement"] = {k: {"cosine": v and v[key]} for k, v in entity.items()}
    report = {**figures["held_out"], "unseen": figures["unseen"], "meta": {
        **vars(args), "train_crops": len(train), "seconds": time.perf_counter() - start}}
    return report, coding.Codes(centre8, spread8, books)


def flat(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of nested ``figures``."""
    out: dict[str, Any] = {}
    for k, v in figures.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report's figures as a markdown table (key of ``trust.json``, held-out, unseen)."""
    held, unseen = (flat({k: v for k, v in f.items() if k not in ("unseen", "meta")})
                    for f in (report, report["unseen"]))
    cells = ("-" if v is None else f"{v:.4g}" for k in held for v in (held[k], unseen.get(k)))
    rows = [f"| {k} | {next(cells)} | {next(cells)} |" for k in held]
    meta = report["meta"]
    return "\n".join([f"Trust report of `{meta['checkpoint']}` ({meta['num_crops']} crops per set)",
                      "", "| figure | held-out | unseen sources |", "|---|---|---|", *rows]) + "\n"


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ")[1])
    add = p.add_argument
    add("checkpoint", help="a compact student: tinyvae_best.pth of a compact run, .safetensors")
    add("--out", required=True, help="folder of trust.json, trust.md, codes.safetensors")
    add("--distilled-pair", nargs=2, metavar=("A", "B"), help="students distilled from one teacher")
    add("--alone-pair", nargs=2, metavar=("C", "D"), help="students trained alone on A's, B's data")
    for flag, default, text in (("--num-crops", 512, "held-out and unseen crops each"),
                                ("--train-crops", 4096, "training crops (PCA, codes, means)"),
                                ("--gallery", 500, "other crops the partner is retrieved among"),
                                ("--token-ids", 4, "token ids per crop (512-entry codebooks)"),
                                ("--threads", 2, "torch threads")):
        add(flag, type=int, default=default, help=f"{text} (default {default})")
    add("--no-device", action="store_true", help="leave out the ONNX graphs' device agreement")
    return p


def command(argv: list[str] | None = None, prog: str = "hrm-vision trust") -> int:
    """Measure, write and print the report; a bad option or file is one line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if min(args.num_crops, args.gallery, args.token_ids, args.threads) < 1 or \
            args.train_crops < 513:
        parser.error("--num-crops, --gallery, --token-ids, --threads must be >= 1 and "
                     "--train-crops > 512 (the codebooks' entries)")
    for path in [args.checkpoint, *(args.distilled_pair or []), *(args.alone_pair or [])]:
        if not Path(path).is_file():
            raise ValueError(f"checkpoint not found: {path}")
    torch.set_num_threads(args.threads)
    args.command = shlex.join([*prog.split(), *argv])
    report, codes = trust_report(args)
    out = Path(args.out)
    write_json(report, out / "trust.json", indent=2)
    write_text(markdown(report), out / "trust.md")
    atomic_write(out / "codes.safetensors", lambda f: f.write(codes.to_bytes()))
    print(markdown(report))
    print(f"wrote {out / 'trust.json'}, {out / 'trust.md'}, {out / 'codes.safetensors'}")
    return 0
