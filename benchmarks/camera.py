"""The student on the robot: camera-frame speed per precision, runtime and thread count; the
compact student's crops per second; ``hrm-vision perceive`` on a video.

``python benchmarks/camera.py [--checkpoint tinyvae_best.pth] [--compact-checkpoint ...]`` (run by
``make bench``) measures, in one process, with the load average printed before and after:

1. the export at fp32, fp16 and int8 (:func:`hrm_vision.export.export_model`: int8 calibrated on
   frames of the training photographs; each precision's cost against eager fp32 on the generated
   frames and the validation photographs, refused over ``--max-cost-db``);
2. single-frame encode+decode (and encode alone) at 480x640 and 1280x720: eager PyTorch
   (fp32, channels-last, :func:`hrm_vision.export.eager_runner`) and ONNX Runtime fp32, fp16,
   int8, each on 1 and 2 threads, every variant in every round (rotating order), with the
   64-channel 3x3 reference convolution (:func:`hrm_vision.evaluate.conv_reference`) on the
   same thread counts: each variant's GFLOP/s (the student's multiply-accumulates, 2 FLOPs each)
   as a share of the reference's;
3. the compact student's encoder in ONNX Runtime (fp32, int8): 64x64 crops per second at batch
   1 and 16, on 1 and 2 threads, interleaved;
4. ``hrm-vision perceive`` on a 480x640 video this script writes (the validation photographs
   panning) with the export folder (its fastest graph that passed the cost check) on
   ``--perceive-threads`` threads: frames per second, latency percentiles, conv share.

Without ``--checkpoint`` the student is data-initialised (patch PCA) and trained alone for
``--train-steps`` steps so its nonlinear stages are non-zero (speed does not depend on the
weights; the precisions' costs do). Without ``--compact-checkpoint`` the compact student is an
untrained ``CompactStudentVAE()`` (speed only). ``--quick`` runs every part on tiny models and
frames, one round: a smoke test of the machinery, not a measurement. Results go to ``--out``
(JSON) and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrm_vision.compact import CompactStudentVAE
from hrm_vision.data import validation_images
from hrm_vision.evaluate import conv_reference
from hrm_vision.export import (
    VAEGraph,
    calibration_frames,
    chain,
    eager_runner,
    export_model,
    export_onnx,
    generated_frames,
    graph_specs,
    onnx_runner,
    photo_frames,
    to_int8,
)
from hrm_vision.io import load
from hrm_vision.timing import interleaved_timings, machine_info
from hrm_vision.vae import MinimalVAE, VAEBase, count_macs

FRAME_SIZES = ((480, 640), (720, 1280))
THREADS = (1, 2)
BATCHES = (1, 16)


def student(checkpoint: str | None, steps: int, quick: bool) -> VAEBase:
    """The checkpoint's student, or a data-initialised one trained alone for ``steps`` steps."""
    if checkpoint:
        return load(checkpoint)
    from hrm_vision.train.loss import DistillLoss

    torch.manual_seed(0)
    train = validation_images("photos", 256 if quick else 4096, 32, split="train")
    model = MinimalVAE(latent_dim=8, base_channels=8) if quick else MinimalVAE()
    model.init_from_data(train)
    loss_fn = DistillLoss(distill_latent_weight=0.0, distill_recon_weight=0.0,
                          perceptual_weight=0.0)
    loss_fn.calibrate(model, train[:256])
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=3e-4)
    model.train()
    for _ in range(steps):
        x = train[torch.randint(0, train.shape[0], (32,))]
        loss = loss_fn(x, model(x), None, None)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def write_video(path: Path, height: int, width: int, frames: int = 60) -> Path:
    """An MJPG video: the validation photographs panning (BGR, as OpenCV writes)."""
    import cv2

    base = (photo_frames(height, width + 160).permute(0, 2, 3, 1).numpy() * 255
            ).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (width, height))
    for i in range(frames):
        img = base[(i // 20) % base.shape[0]]
        shift = (i % 20) * 8
        writer.write(np.ascontiguousarray(img[:, shift:shift + width, ::-1]))
    writer.release()
    return path


def threaded(threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with torch on ``threads`` threads (eager runs and the reference conv)."""
    def run() -> object:
        torch.set_num_threads(threads)
        return fn()

    return run


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def frame_speed(vae: VAEBase, graphs: dict[str, dict[str, str]], sizes: tuple[tuple[int, int], ...],
                threads: tuple[int, ...], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{"HxW": {variant: {median_ms, p90_ms, fps, gflops, conv_share}}}``: eager and each
    precision's ONNX Runtime encode+decode (``roundtrip``) and encode alone, on each thread
    count, with the reference conv per thread count, all interleaved."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    sessions = {(p, part, t): onnx_runner(graphs[p][part], t)
                for p in graphs for part in ("encoder", "decoder") for t in threads}
    eager = {part: eager_runner(vae, part) for part in ("encode", "decode")}
    for height, width in sizes:
        x = torch.rand(1, vae.in_channels, height, width)
        conv, conv_flops = conv_reference(height, width)
        fns: dict[str, Callable[[], object]] = {}
        flops: dict[str, int] = {}
        both, enc = (2 * count_macs(vae, height, width, p) for p in ("both", "encode"))
        for t in threads:
            fns[f"conv3x3_64 t{t}"] = threaded(t, conv)
            fns[f"eager fp32 roundtrip t{t}"] = threaded(
                t, lambda x=x: eager["decode"](eager["encode"](x)))
            flops[f"eager fp32 roundtrip t{t}"] = both
            for p in graphs:
                e, d = sessions[(p, "encoder", t)], sessions[(p, "decoder", t)]
                fns[f"onnxruntime {p} roundtrip t{t}"] = lambda e=e, d=d, x=x: chain(e, d)(x)
                fns[f"onnxruntime {p} encode t{t}"] = lambda e=e, x=x: e(x)
                flops[f"onnxruntime {p} roundtrip t{t}"] = both
                flops[f"onnxruntime {p} encode t{t}"] = enc
        with torch.inference_mode():
            seconds = interleaved_timings(fns, repeats, 1, f"frames {height}x{width}")
        row: dict[str, dict[str, float]] = {}
        for name, s in seconds.items():
            median = float(np.median(s))
            t = int(name.rsplit("t", 1)[1])
            conv_gflops = conv_flops / float(np.median(seconds[f"conv3x3_64 t{t}"])) / 1e9
            gflops = flops.get(name, conv_flops) / median / 1e9
            row[name] = {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(s, 90)),
                         "fps": 1 / median, "gflops": gflops, "conv_share": gflops / conv_gflops}
        out[f"{height}x{width}"] = row
    return out


def compact_speed(compact: VAEBase, folder: Path, threads: tuple[int, ...], repeats: int,
                  quick: bool) -> dict[str, dict[str, float]]:
    """Crops per second of the compact encoder in ONNX Runtime, fp32 and int8 (calibrated on
    64x64 frames of the training photographs), at each of :data:`BATCHES` and thread count."""
    side = compact.image_size
    spec = graph_specs(compact, side)[0]
    fp32 = export_onnx(VAEGraph(compact, "encoder"), spec, folder / "compact_encoder.onnx",
                       spec.metadata(compact, "benchmark"))
    calibration = calibration_frames(side, side)[:4 if quick else None]
    files = {"fp32": fp32, "int8": to_int8(fp32, calibration)}
    crops = validation_images("photos", max(BATCHES), side)
    runners = {(p, t): onnx_runner(f, t) for p, f in files.items() for t in threads}
    fns = {f"{p} batch {b} t{t}": partial(runners[(p, t)], crops[:b])
           for p in files for b in BATCHES for t in threads}
    seconds = interleaved_timings(fns, repeats * 10, 2, "compact crops")
    return {name: {"median_ms": 1e3 * float(np.median(s)),
                   "crops_per_s": int(name.split("batch ")[1].split()[0]) / float(np.median(s))}
            for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="student checkpoint (default: data-initialised)")
    parser.add_argument("--compact-checkpoint", help="compact student (default: untrained)")
    parser.add_argument("--perceive-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--max-cost-db", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and frames, one round: checks the machinery")
    parser.add_argument("--out", default=".benchmarks/camera.json")
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = ((48, 64), (64, 96)) if quick else FRAME_SIZES
    repeats = 1 if quick else args.repeats
    report: dict[str, Any] = {"machine": machine_info(), "load_average_before": load_average(),
                              "command": " ".join(["python benchmarks/camera.py",
                                                   *(sys.argv[1:] if argv is None else argv)])}
    print(f"load average before: {report['load_average_before']}", flush=True)
    vae = student(args.checkpoint, 5 if quick else args.train_steps, quick)
    compact = load(args.compact_checkpoint) if args.compact_checkpoint else \
        CompactStudentVAE(latent_dim=8, base_channels=4) if quick else CompactStudentVAE()
    report["student"] = args.checkpoint or f"data-initialised, trained alone for " \
                                           f"{5 if quick else args.train_steps} steps"
    report["compact_student"] = args.compact_checkpoint or "untrained (speed only)"
    with tempfile.TemporaryDirectory() as tmp:
        exports = Path(tmp) / "exports"
        calib = (32, 32) if quick else (128, 160)
        result = export_model(vae, exports, validation_images("photos", 16, 32),
                              source="benchmark", precisions=("fp32", "fp16", "int8"),
                              calibration=calibration_frames(*calib)[:4 if quick else None],
                              frame=torch.rand(1, 3, *sizes[0]), frame_repeats=repeats,
                              cost_frames={f"generated {h}x{w}": generated_frames(h, w)
                                           for h, w in sizes[:1]} if quick else None,
                              max_cost_db=args.max_cost_db)
        report["cost_check"] = result.cost_check
        report["frames"] = frame_speed(vae, result.precision_files, sizes, THREADS, repeats)
        report["compact"] = compact_speed(compact, Path(tmp), THREADS, repeats, quick)
        from hrm_vision.perceive import command as perceive

        video = write_video(Path(tmp) / "pan.avi", *sizes[0], frames=6 if quick else 120)
        perceive([str(video), "--model", str(exports), "--threads", str(args.perceive_threads),
                  "--out-dir", f"{tmp}/perceived"])
        report["perceive"] = json.loads(Path(f"{tmp}/perceived/summary.json").read_text())
    report["load_average_after"] = load_average()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| frame | variant | median | p90 | fps | GFLOP/s | of the 3x3 conv |")
    print("|---|---|---|---|---|---|---|")
    for size, row in report["frames"].items():
        for name, r in row.items():
            print(f"| {size} | {name} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms | "
                  f"{r['fps']:.2f} | {r['gflops']:.1f} | {100 * r['conv_share']:.0f}% |")
        for t in THREADS:
            fp32 = row[f"onnxruntime fp32 roundtrip t{t}"]["median_ms"]
            int8 = row[f"onnxruntime int8 roundtrip t{t}"]["median_ms"]
            print(f"| {size} | int8 / fp32 ONNX Runtime speed, {t} thread(s) | {fp32 / int8:.2f}x "
                  "| | | | |")
    print("\n| precision | collection | cost round trip / encoder / decoder |\n|---|---|---|")
    for p, check in report["cost_check"].items():
        for name, c in check["costs_db"].items():
            print(f"| {p} | {name} | {c['psnr_cost_db']:+.3f} / {c['encoder_cost_db']:+.3f} / "
                  f"{c['decoder_cost_db']:+.3f} dB |")
    print("\n| compact encoder | median | crops/s |\n|---|---|---|")
    for name, r in report["compact"].items():
        print(f"| {name} | {r['median_ms']:.2f} ms | {r['crops_per_s']:.0f} |")
    s = report["perceive"]
    print(f"\nperceive {s['frames']} frames {s['frame_size']}, {s['precision']}, {s['threads']} "
          f"threads: {s['fps']:.2f} fps, latency p50 {s['latency_p50_ms']:.1f} / p90 "
          f"{s['latency_p90_ms']:.1f} / p99 {s['latency_p99_ms']:.1f} ms, "
          f"{100 * s['conv_share']:.0f}% of the conv throughput")
    print(f"machine: {report['machine']['cpu']}; load average before "
          f"{report['load_average_before']}, after {report['load_average_after']}; wrote "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
