"""int8 calibration on camera frames: what each calibration costs against fp32 on 400x640 frames.

    python -m experiments.int8_frames --checkpoint checkpoints/tinyvae_best.pth \\
        --frames data/corpus --out experiments/results/int8_frames.json

Exports the student's encoder and decoder to ONNX with the package's own functions
(:func:`hrm_vision.export.export_onnx` of :class:`hrm_vision.export.VAEGraph`), then builds int8
variants of both with ``onnxruntime.quantization.quantize_static`` and compares them with the
fp32 graphs on the held-out pictures of the corpus (``--frames``: a folder whose
``manifest.json`` lists images with ``"split": "val"``, e.g. the one ``benchmarks/corpus.py``
builds), each resized to cover the frame and centre-cropped to ``--size``. Variants:

* ``f_export``: what ``hrm-vision export`` writes now: :func:`hrm_vision.export.to_int8` on
  :func:`hrm_vision.export.calibration_frames` (the training photographs whole at zooms 1, 2, 4
  and their flattest window, 128x160), the decoder on their latents;
* ``a_package``: :func:`hrm_vision.export.to_int8` on what the export used to calibrate it
  with (``--calibration-images`` 32x32 training crops of ``photos``; almost flat crops rejected);
  ``a_package_same_settings``: the same through this script's own ``quantize_static`` call (the
  settings below are the package's unless a variant changes them);
* ``b_frames``: the same settings (QDQ, per-channel int8 weights, uint8 asymmetric activations,
  Percentile :data:`hrm_vision.export.CALIBRATION_PERCENTILE`) calibrated on whole training
  photographs of ``photos`` at several sizes (their flat regions included);
* ``c_frames_per_tensor``: (b) with per-tensor weights (the package's are per-channel);
* ``d_frames_minmax``, ``d_frames_entropy``, ``d_frames_symmetric``: (b) with the MinMax or
  Entropy calibration, or with symmetric activations;
* ``e_frames_fp32_ends``: (b) with the encoder's first and the decoder's last quantised
  convolution left in float32 (``nodes_to_exclude``); ``e_frames_fp32_latent_conv`` and
  ``e_package_fp32_latent_conv``: (b) and (a) with the decoder's first quantised convolution (the
  one reading the latent) left in float32.

For each: pooled PSNR of ``decode(encode(x))`` against the frames (both graphs int8, as the export
ships them) and its cost in dB against the fp32 graphs, the cost of the int8 encoder alone (fp32
decoder) and of the int8 decoder alone, and the single-frame encode+decode latency on one thread,
interleaved round by round with fp32 and the other variants; the machine and its load average.
Then (unless ``--no-sensitivity``) the cost of the (b) int8 decoder alone with each of its
quantised convolutions in turn left in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor

from hrm_vision.data import PHOTOS, VAL_PHOTOS, load_photo, read_image, validation_images
from hrm_vision.export import (
    CALIBRATION_PERCENTILE,
    CALIBRATION_SIZE,
    VAEGraph,
    _linear_path_convs,
    calibration_frames,
    export_onnx,
    graph_specs,
    ort_session,
    parse_size,
    run_onnx,
    to_int8,
)
from hrm_vision.io import load_checkpoint, model_from_payload
from hrm_vision.metrics import psnr
from hrm_vision.timing import interleaved_timings, machine_info
from hrm_vision.vae import VAEBase

PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class Variant:
    """One int8 build: its calibration (``"package"`` or ``"frames"``) and quantisation settings."""

    name: str
    calibration: str
    method: str = "Percentile"  # onnxruntime.quantization.CalibrationMethod member
    per_channel: bool = True
    symmetric: bool = False
    fp32_convs: str = ""  # "ends": encoder's first + decoder's last; "latent": decoder's first

    def describe(self) -> str:
        if self.calibration == "export":
            return "hrm_vision.export.to_int8 on hrm_vision.export.calibration_frames"
        if self.calibration == "package" and self.method == "to_int8":
            return "hrm_vision.export.to_int8 on the export's former calibration crops"
        where = ("the export's calibration crops; " if self.calibration == "package"
                 else "training-photograph frames; ")
        parts = [f"{self.method}" + (f" {CALIBRATION_PERCENTILE}" if self.method == "Percentile"
                                     else ""),
                 "per-channel" if self.per_channel else "per-tensor",
                 "symmetric" if self.symmetric else "asymmetric",
                 {"ends": "encoder's first and decoder's last conv fp32",
                  "latent": "decoder's first conv (reads the latent) fp32"}.get(self.fp32_convs,
                                                                                "")]
        return where + ", ".join(p for p in parts if p)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("f_export", "export", method="to_int8"),
    Variant("a_package", "package", method="to_int8"),
    Variant("a_package_same_settings", "package"),
    Variant("b_frames", "frames"),
    Variant("c_frames_per_tensor", "frames", per_channel=False),
    Variant("d_frames_minmax", "frames", method="MinMax"),
    Variant("d_frames_entropy", "frames", method="Entropy"),
    Variant("d_frames_symmetric", "frames", symmetric=True),
    Variant("e_frames_fp32_ends", "frames", fp32_convs="ends"),
    Variant("e_frames_fp32_latent_conv", "frames", fp32_convs="latent"),
    Variant("e_package_fp32_latent_conv", "package", fp32_convs="latent"),
)}


def cover_crop(img: Tensor, height: int, width: int) -> Tensor:
    """``(1, 3, H, W)`` ``img`` resized (antialiased bilinear) to cover ``height`` x ``width``,
    then centre-cropped to it, as :func:`hrm_vision.export.photo_frames` does."""
    scale = max(height / img.shape[2], width / img.shape[3])
    size = (max(height, round(img.shape[2] * scale)), max(width, round(img.shape[3] * scale)))
    img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return img[:, :, top:top + height, left:left + width].clamp(0, 1)


def corpus_frames(folder: Path, height: int, width: int) -> tuple[Tensor, list[str]]:
    """The ``"val"`` images of ``folder/manifest.json`` as ``(N, 3, height, width)`` frames."""
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [e["file"] for e in manifest["images"] if e.get("split") == "val"]
    if not names:
        raise SystemExit(f"{folder / 'manifest.json'} lists no image with \"split\": \"val\"")
    frames = [cover_crop(torch.from_numpy(read_image(folder / n)).permute(2, 0, 1)[None],
                         height, width) for n in names]
    return torch.cat(frames).contiguous(), names


def photo_calibration(height: int, width: int, zooms: Sequence[float]) -> list[Tensor]:
    """Training photographs of ``photos`` (all but the validation ones) as ``(1, 3, height,
    width)`` frames: each resized to cover the frame, magnified by each of ``zooms``, then
    centre-cropped (zoom 1: the whole photograph as far as the aspect allows, flat regions
    included; zoom 2: its centre at twice the scale). One shape for all: ONNX Runtime's histogram
    calibrators stack the activations of every calibration input."""
    out = []
    for name in (p for p in PHOTOS if p not in VAL_PHOTOS):
        img = torch.from_numpy(load_photo(name)).permute(2, 0, 1)[None].float() / 255.0
        for zoom in zooms:
            big = cover_crop(img, round(height * zoom), round(width * zoom))
            out.append(cover_crop(big, height, width) if zoom == 1 else
                       big[:, :, (big.shape[2] - height) // 2:][:, :, :height,
                           (big.shape[3] - width) // 2:][..., :width].contiguous())
    return out


def quantised_convs(path: Path) -> list[str]:
    """The convolutions of ``path`` that the int8 graph quantises, in graph order."""
    model = onnx.load(str(path))
    skip = set(_linear_path_convs(model))
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in skip]


def quantise(fp32_path: Path, out_path: Path, calibration: Sequence[Tensor], v: Variant,
             exclude: Callable[[list[str]], list[str]]) -> tuple[Path, list[str]]:
    """The QDQ int8 graph of ``fp32_path`` with :func:`hrm_vision.export.to_int8`'s settings,
    changed by ``v``; ``calibration``: inputs of the graph, one batch each (any size).
    ``exclude`` picks, from the quantised convolutions, those to leave in float32."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(fp32_path)).graph.input[0].name
    batches = iter(calibration)

    class Reader(q.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {name: batch.float().numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        kept = exclude(quantised_convs(prepared))
        extra: dict[str, Any] = {"ActivationSymmetric": v.symmetric}
        if v.method == "Percentile":
            extra["CalibPercentile"] = CALIBRATION_PERCENTILE
        with contextlib.redirect_stdout(io.StringIO()):
            q.quantize_static(str(prepared), str(out_path), Reader(),
                              quant_format=q.QuantFormat.QDQ, per_channel=v.per_channel,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              op_types_to_quantize=["Conv"],
                              nodes_to_exclude=_linear_path_convs(onnx.load(str(prepared)))
                              + kept,
                              calibrate_method=getattr(q.CalibrationMethod, v.method),
                              extra_options=extra)
    return out_path, kept


def build(v: Variant, fp32: dict[str, Path], folder: Path,
          calibration: dict[str, dict[str, Sequence[Tensor]]]) -> dict[str, Any]:
    """The int8 encoder and decoder of variant ``v`` in ``folder``, and how long they took."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kept: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    if v.method == "to_int8":
        for part in PARTS:
            copy = shutil.copy(fp32[part], folder / fp32[part].name)
            files[part] = to_int8(copy, torch.cat(list(calibration[v.calibration][part])))
            kept[part] = []
    else:
        for part in PARTS:
            def ends(convs: list[str], part: str = part) -> list[str]:
                if not convs or v.fp32_convs not in ("ends", "latent"):
                    return []
                if v.fp32_convs == "latent":
                    return [convs[0]] if part == "decoder" else []
                return [convs[0] if part == "encoder" else convs[-1]]

            files[part], kept[part] = quantise(fp32[part], folder / f"{part}.int8.onnx",
                                               calibration[v.calibration][part], v, ends)
    return {"files": files, "fp32_convs": kept,
            "build_s": round(time.perf_counter() - start, 1)}


def roundtrip_psnr(enc: ort.InferenceSession, dec: ort.InferenceSession, frames: Tensor
                   ) -> tuple[float, list[float]]:
    """Pooled PSNR of ``dec(enc(x))`` against ``frames``, and each frame's."""
    out = torch.cat([run_onnx(dec, run_onnx(enc, x[None])) for x in frames])
    return psnr(out, frames), [round(psnr(o[None], x[None]), 3) for o, x in zip(out, frames,
                                                                               strict=True)]


def uptime() -> str:
    """``uptime``'s line (load averages of other jobs on the machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint holding the student")
    p.add_argument("--frames", type=Path, default=Path("data/corpus"),
                   help="folder with manifest.json listing the val images (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--size", default="400x640", help="frame HxW (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variants (default all: %(default)s)")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="training crops of the package's calibration (export's default 256)")
    p.add_argument("--calibration-size", default="240x320",
                   help="HxW of the training-photograph frames (default %(default)s)")
    p.add_argument("--calibration-zooms", default="1,2",
                   help="magnifications of each training photograph (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (default 5)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the decoder sweep (each quantised conv alone left in float32)")
    p.add_argument("--eval-threads", type=int, default=2,
                   help="threads of the PSNR runs (timing is always one thread)")
    args = p.parse_args(argv)
    height, width = parse_size(args.size)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.eval_threads)
    load_start = uptime()
    print(f"uptime: {load_start}", flush=True)

    vae = model_from_payload(load_checkpoint(args.checkpoint), "student", source=args.checkpoint)
    assert isinstance(vae, VAEBase)
    vae.eval()
    frames, frame_names = corpus_frames(args.frames, height, width)
    crops = validation_images("photos", args.calibration_images, 32, split="train")
    zooms = [float(z) for z in args.calibration_zooms.split(",")]
    photos = photo_calibration(*parse_size(args.calibration_size), zooms)
    exported = calibration_frames(*CALIBRATION_SIZE)
    with torch.inference_mode():
        calibration = {
            "package": {"encoder": list(crops.split(32)),  # to_int8's batches
                        "decoder": list(vae.encode(crops).split(32))},
            "frames": {"encoder": photos, "decoder": [vae.encode(x) for x in photos]},
            "export": {"encoder": [exported], "decoder": [vae.encode(exported)]}}
    print(f"{len(frame_names)} frames {height}x{width}; calibration: {len(crops)} crops 32x32, "
          f"{len(photos)} training-photograph frames {args.calibration_size} (zooms {zooms})",
          flush=True)

    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m experiments.int8_frames " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "machine": machine_info(), "uptime_start": load_start, "onnxruntime": ort.__version__,
        "checkpoint": str(args.checkpoint), "arch": vae.arch_config(),
        "frames": {"size": f"{height}x{width}", "folder": str(args.frames),
                   "files": frame_names},
        "calibration": {
            "package": f"{len(crops)} 32x32 training crops of photos (validation_images(..., "
                       "split='train')), almost flat crops rejected",
            "frames": f"{len(photos)} {args.calibration_size} frames of the "
                      f"{len(photos) // len(zooms)} training photographs of photos, each "
                      f"covering the frame at zooms {zooms} (centre crops)",
            "export": f"hrm_vision.export.calibration_frames{CALIBRATION_SIZE}: {len(exported)} "
                      "frames"},
        "variants": {}}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32: dict[str, Path] = {}
        for spec in graph_specs(vae, 32):
            fp32[spec.part] = export_onnx(VAEGraph(vae, spec.part), spec,
                                          folder / f"tinyvae_{spec.part}.onnx",
                                          spec.metadata(vae, Path(args.checkpoint).name))
        sessions = {"fp32": {k: ort_session(v, args.eval_threads) for k, v in fp32.items()}}
        fp32_db, fp32_frames = roundtrip_psnr(sessions["fp32"]["encoder"],
                                              sessions["fp32"]["decoder"], frames)
        with torch.inference_mode():
            eager_db = psnr(vae.decode(vae.encode(frames)), frames)
        result["fp32"] = {"psnr_db": round(fp32_db, 3), "eager_psnr_db": round(eager_db, 3),
                          "per_frame_psnr_db": fp32_frames}
        print(f"fp32 {fp32_db:.2f} dB (eager {eager_db:.2f} dB)", flush=True)
        files: dict[str, dict[str, Path]] = {"fp32": fp32}
        for name in names:
            v = VARIANTS[name]
            built = build(v, fp32, folder / name, calibration)
            files[name] = built["files"]
            enc, dec = (ort_session(built["files"][k], args.eval_threads) for k in PARTS)
            db, per_frame = roundtrip_psnr(enc, dec, frames)
            enc_db, _ = roundtrip_psnr(enc, sessions["fp32"]["decoder"], frames)
            dec_db, _ = roundtrip_psnr(sessions["fp32"]["encoder"], dec, frames)
            result["variants"][name] = {
                "settings": v.describe(), "psnr_db": round(db, 3),
                "cost_db": round(fp32_db - db, 3),
                "encoder_only_cost_db": round(fp32_db - enc_db, 3),
                "decoder_only_cost_db": round(fp32_db - dec_db, 3),
                "per_frame_cost_db": [round(a - b, 3) for a, b in zip(fp32_frames, per_frame,
                                                                      strict=True)],
                "fp32_convs": built["fp32_convs"], "build_s": built["build_s"]}
            print(f"{name:22s} {db:6.2f} dB  cost {fp32_db - db:+7.3f} dB  (encoder alone "
                  f"{fp32_db - enc_db:+.3f}, decoder alone {fp32_db - dec_db:+.3f}; built in "
                  f"{built['build_s']} s)", flush=True)

        if not args.no_sensitivity:  # (b) decoder with one quantised conv at a time in fp32
            sweep: dict[str, float] = {}
            v = VARIANTS["b_frames"]
            with tempfile.TemporaryDirectory() as work:
                prepared = Path(work) / "prepared.onnx"
                from onnxruntime.quantization.shape_inference import quant_pre_process
                quant_pre_process(str(fp32["decoder"]), str(prepared), skip_symbolic_shape=True)
                for conv in quantised_convs(prepared):
                    path, _ = quantise(fp32["decoder"], Path(work) / "decoder.int8.onnx",
                                       calibration["frames"]["decoder"], v,
                                       lambda _, conv=conv: [conv])
                    db, _ = roundtrip_psnr(sessions["fp32"]["encoder"],
                                           ort_session(path, args.eval_threads), frames)
                    sweep[conv] = round(fp32_db - db, 3)
                    print(f"decoder int8 (b) but {conv} fp32: cost {fp32_db - db:+.3f} dB",
                          flush=True)
            result["decoder_sweep_cost_db"] = sweep

        # one frame, one thread, every graph pair in each round
        frame = frames[:1].numpy()
        runners: dict[str, Callable[[], object]] = {}
        for name, pair in files.items():
            enc, dec = (ort_session(pair[k], 1) for k in PARTS)
            e_in, d_in = enc.get_inputs()[0].name, dec.get_inputs()[0].name

            def run(enc: ort.InferenceSession = enc, dec: ort.InferenceSession = dec,
                    e_in: str = e_in, d_in: str = d_in) -> object:
                (z,) = enc.run(None, {e_in: frame})
                return dec.run(None, {d_in: z})

            runners[name] = run
        load_timing = uptime()
        print(f"uptime: {load_timing}", flush=True)
        seconds = interleaved_timings(runners, args.repeats, 1, "frame")
    medians = {k: float(np.median(s)) for k, s in seconds.items()}
    result["timing"] = {"frame": f"{height}x{width}", "threads": 1, "repeats": args.repeats,
                        "uptime": load_timing, "uptime_end": uptime(),
                        "fp32_median_ms": round(1e3 * medians["fp32"], 1)}
    for name in names:
        entry = result["variants"][name]
        entry["median_ms"] = round(1e3 * medians[name], 1)
        entry["p90_ms"] = round(1e3 * float(np.percentile(seconds[name], 90)), 1)
        entry["speed_vs_fp32"] = round(medians["fp32"] / medians[name], 2)
    print(f"fp32 {1e3 * medians['fp32']:.0f} ms per frame, one thread")
    for name in names:
        e = result["variants"][name]
        print(f"{name:22s} cost {e['cost_db']:+7.3f} dB  {e['median_ms']:7.0f} ms  "
              f"{e['speed_vs_fp32']:.2f}x fp32")
    print(f"uptime: {result['timing']['uptime_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False,
                                   default=lambda o: None if isinstance(o, float)
                                   and not math.isfinite(o) else str(o)) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
