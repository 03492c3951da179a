"""Exports checked against the eager PyTorch model, and their speed compared with it.

- :func:`check_parity`: every fp32 file within :data:`PARITY_TOLERANCE` of eager (the gate);
- :func:`precision_costs`: each precision's largest error and PSNR cost against eager fp32;
- :func:`compare_runtimes`, :func:`frame_latency`: speed, interleaved in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..metrics import psnr
from ..timing import interleaved_timings, summarize_timings
from ..vae import VAEBase
from .graphs import ExportError
from .onnx import ort_session, run_onnx
from .torchscript import load_torchscript

#: Largest absolute difference allowed between an export and the eager model.
PARITY_TOLERANCE = 1e-4


@torch.inference_mode()
def check_parity(vae: VAEBase, files: dict[str, str], images: Tensor,
                 tolerance: float = PARITY_TOLERANCE,
                 adapter: nn.Module | None = None) -> dict[str, float]:
    """Largest absolute difference of each exported file against the eager ``vae``.

    ``files``: ``{f"{part}_{onnx|torchscript}": path}`` as :func:`export_model` writes it.
    ``images``: (N, 3, H, W) in [0, 1]. Encoders are fed the images, decoders the eager latents;
    the teacher-space encoder is compared with ``adapter(vae.encode(images))`` (N, teacher_dim,
    H/8, W/8), so it needs ``adapter``. The reference is the un-folded eager model, so the check
    covers BatchNorm folding too. Raises ``ExportError`` naming the files beyond ``tolerance``.
    """
    vae = vae.eval()
    latent = vae.encode(images)
    reference = {"encoder": (images, latent), "decoder": (latent, vae.decode(latent))}
    if adapter is not None:
        reference["encoder_teacher_space"] = (images, adapter.eval()(latent))
    diffs: dict[str, float] = {}
    for key, path in files.items():
        part = key.rsplit("_", 1)[0]
        if part not in reference:
            raise ExportError(f"no eager reference for {key} ({path}): "
                              + ("the teacher-space encoder needs the adapter"
                                 if part == "encoder_teacher_space" else "unknown graph"))
        x, expected = reference[part]
        got = run_onnx(ort_session(path), x) if key.endswith("onnx") \
            else load_torchscript(path)(x)
        if got.shape != expected.shape:
            raise ExportError(f"{key} ({path}) gives shape {tuple(got.shape)}, eager "
                              f"{tuple(expected.shape)}")
        diffs[key] = float((got - expected).abs().max())
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise ExportError(f"exports differ from eager PyTorch by more than {tolerance}: {bad}")
    return diffs


@torch.inference_mode()
def compare_runtimes(vae: VAEBase, files: dict[str, str], images: Tensor, repeats: int,
                     warmup: int = 2) -> dict[str, float]:
    """Encode+decode throughput (images/s, median) of eager PyTorch, ONNX Runtime, TorchScript.

    The three run in turns in this process (see
    :func:`hrm_vision.timing.interleaved_timings`) on ``images`` (N, 3, S, S), with
    ONNX Runtime given as many threads as torch (``torch.get_num_threads()``).
    """
    threads = torch.get_num_threads()
    enc = ort_session(files["encoder_onnx"], threads)
    dec = ort_session(files["decoder_onnx"], threads)
    ts_enc = load_torchscript(files["encoder_torchscript"])
    ts_dec = load_torchscript(files["decoder_torchscript"])
    vae = vae.eval()
    fns = {"pytorch_eager": lambda: vae.decode(vae.encode(images)),
           "onnxruntime": lambda: run_onnx(dec, run_onnx(enc, images)),
           "torchscript": lambda: ts_dec(ts_enc(images))}
    times = interleaved_timings(fns, repeats, warmup, desc="runtimes")
    return {k: summarize_timings(v, images.shape[0])["throughput_ips"] for k, v in times.items()}


def size_key(images: Tensor) -> str:
    """``"HxW"`` of an ``(N, C, H, W)`` batch."""
    return f"{images.shape[-2]}x{images.shape[-1]}"


@torch.inference_mode()
def precision_costs(vae: VAEBase, graphs: Mapping[str, Mapping[str, str]],
                    images_by_size: Mapping[str, Tensor]) -> dict[str, dict[str, dict[str, float]]]:
    """What each precision costs against eager fp32, at each frame size.

    ``graphs``: ``{precision: {"encoder": path, "decoder": path}}`` (ONNX files).
    ``images_by_size``: ``{"HxW": (N, 3, H, W) images in [0, 1]}``. Returns
    ``{precision: {"HxW": {...}}}`` with ``encoder_max_abs_err`` (latent, against
    ``vae.encode``), ``decoder_max_abs_err`` (image, decoding the eager latent),
    ``roundtrip_max_abs_err`` (graph decoder of graph encoder against eager
    ``decode(encode(x))``), ``psnr_db`` (round trip against the input, pooled over the images),
    ``eager_psnr_db`` and ``psnr_cost_db`` (eager minus graph; positive is a loss).
    """
    vae = vae.eval()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for precision, files in graphs.items():
        enc, dec = ort_session(files["encoder"]), ort_session(files["decoder"])
        out[precision] = {}
        for key, x in images_by_size.items():
            z = vae.encode(x)
            x_hat = vae.decode(z)
            z_graph = run_onnx(enc, x)
            roundtrip = run_onnx(dec, z_graph)
            eager_db, graph_db = psnr(x_hat, x), psnr(roundtrip, x)
            out[precision][key] = {
                "encoder_max_abs_err": float((z_graph - z).abs().max()),
                "decoder_max_abs_err": float((run_onnx(dec, z) - x_hat).abs().max()),
                "roundtrip_max_abs_err": float((roundtrip - x_hat).abs().max()),
                "psnr_db": graph_db, "eager_psnr_db": eager_db,
                "psnr_cost_db": eager_db - graph_db}
    return out


@torch.inference_mode()
def frame_latency(runners: Mapping[str, Callable[[Tensor], Tensor]], frame: Tensor,
                  repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Single-frame latency of each runner (``frame`` (1, 3, H, W) in [0, 1]), interleaved.

    Returns ``{name: {"median_ms", "p90_ms", "fps"}}`` (fps: frames per second at the median).
    """
    times = interleaved_timings({k: (lambda f=f: f(frame)) for k, f in runners.items()},
                                repeats, warmup, desc=f"frame {size_key(frame)}")
    out = {}
    for name, seconds in times.items():
        stats = summarize_timings(seconds, 1)
        out[name] = {"median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                     "fps": stats["throughput_ips"]}
    return out
