"""Model footprint: parameters, weight file sizes and multiply-accumulates, same for both models."""

from __future__ import annotations

import os
import tempfile

import torch

from ..vae import VAEBase, count_macs


def weight_file_bytes(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Size in bytes of ``model.state_dict()`` saved alone with ``torch.save``.

    Floating-point tensors are cast to ``dtype`` (``torch.float32`` or ``torch.float16``);
    integer buffers (BatchNorm's ``num_batches_tracked``) are kept. No optimizer state, no
    adapter, no training metadata: this is the file a deployment ships, measured the same way
    for every model (the size comparison of the earlier implementation was not).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    fd, path = tempfile.mkstemp(suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def footprint(model: VAEBase, image_size: int = 32) -> dict[str, int]:
    """Parameters, fp32/fp16 weight file bytes, and MACs per ``image_size``² image.

    Keys: ``parameters``, ``weights_fp32_bytes``, ``weights_fp16_bytes``, ``macs_encode``,
    ``macs_decode``, ``macs_both`` (see :func:`hrm_vision.vae.count_macs`).
    """
    return {
        "parameters": model.num_parameters(),
        "weights_fp32_bytes": weight_file_bytes(model, torch.float32),
        "weights_fp16_bytes": weight_file_bytes(model, torch.float16),
        **{f"macs_{part}": count_macs(model, image_size, image_size, part)
           for part in ("encode", "decode", "both")},
    }
