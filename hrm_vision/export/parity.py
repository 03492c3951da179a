"""Exports checked against the eager PyTorch model, and their speed compared with it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    ``images``: (N, 3, S, S) in [0, 1]. Encoders are fed the images, decoders the eager latents;
    the teacher-space encoder is compared with ``adapter(vae.encode(images))`` (N, teacher_dim,
    S/8, S/8), so it needs ``adapter``. The reference is the un-folded eager model, so the check
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
    :func:`hrm_vision.evaluation.timing.interleaved_timings`) on ``images`` (N, 3, S, S), with
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
