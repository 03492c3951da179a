"""Ways to run the TinyVAE on a frame: eager PyTorch (tuned for inference) and ONNX Runtime.

Each runner is a callable ``(N, C, H, W) float32 tensor -> tensor``: an encoder takes images in
[0, 1] (RGB, NCHW) and returns latents ``(N, C, H/8, W/8)``; a decoder the reverse. The frame
pipeline (:mod:`hrm_vision.perceive`), the camera-resolution speed measurement
(:mod:`hrm_vision.evaluation.speed`) and the export's runtime comparison use them.

Eager inference runs the model unchanged (same weights, same operators) under
``torch.inference_mode`` with the activations in channels-last memory format, which the CPU
convolution kernels (oneDNN) run without converting layouts; outputs equal the default path up to
float rounding (``tests/test_export_runtime.py`` bounds the difference by the export parity
tolerance, 1e-4).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..vae import VAEBase

Runner = Callable[[Tensor], Tensor]
#: The halves of the model a runner can run.
PARTS = ("encode", "decode")


def eager_runner(vae: VAEBase, part: str = "encode", channels_last: bool = True) -> Runner:
    """``vae.encode`` or ``vae.decode`` for inference: an eval-mode copy (the caller's model is
    not touched), ``inference_mode``, and with ``channels_last`` the weights and the input in
    channels-last memory format. The output is returned in the default (contiguous) layout."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    model = copy.deepcopy(vae).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    fn = getattr(model, part)

    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:
        # a compact model's vector latent (N, L) has no channels-last layout
        return fn(x.contiguous(memory_format=layout) if x.dim() == 4 else x).contiguous()

    return run


def onnx_runner(path: str | os.PathLike[str], threads: int | None = None) -> Runner:
    """An ONNX Runtime CPU session of ``path`` (``threads`` intra-op threads) as a runner."""
    from .onnx import ort_session, run_onnx

    session = ort_session(path, threads)
    return lambda x: run_onnx(session, x)


def chain(first: Runner, second: Runner) -> Runner:
    """``second(first(x))``: an encoder then a decoder is a round trip."""
    return lambda x: second(first(x))
