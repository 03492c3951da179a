"""Both halves of a VAE to ONNX and TorchScript, folded and checked: :func:`export_model`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..vae import VAEBase
from ..vae.pretrained import save_pretrained
from .fold import fold_batchnorm
from .graphs import DecoderGraph, EncoderGraph, graph_specs
from .onnx import DEFAULT_OPSET, export_onnx
from .parity import check_parity
from .torchscript import export_torchscript


@dataclass
class ExportResult:
    """Paths of the exported files and the measured parity with the eager model."""

    files: dict[str, str]
    max_abs_diff: dict[str, float]
    metadata: dict[str, dict[str, str]]
    num_images: int
    exporter: str = "torch.onnx.export(dynamo=True)"
    #: encode+decode images/s per runtime (median, interleaved), see :func:`compare_runtimes`.
    throughput_ips: dict[str, float] = field(default_factory=dict)
    throughput_batch: int = 0
    #: the weights as ``.safetensors`` with the architecture in the metadata
    weights_file: str = ""


def export_model(vae: VAEBase, out_dir: str | os.PathLike[str], images: Tensor,
                 source: str = "", opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export encoder and decoder of ``vae`` to ONNX and TorchScript in ``out_dir``, checked,
    and its weights to ``tinyvae.safetensors`` (loadable with ``MinimalVAE.from_pretrained``).

    ``images``: real (N, 3, S, S) images in [0, 1]; S is the exported image side.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square images (N, 3, S, S), got {tuple(images.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folded = fold_batchnorm(vae)
    files: dict[str, str] = {}
    metadata: dict[str, dict[str, str]] = {}
    for spec, graph in zip(graph_specs(vae, images.shape[-1]),
                           (EncoderGraph(folded), DecoderGraph(folded)), strict=True):
        meta = spec.metadata(vae, source)
        metadata[spec.part] = meta
        files[f"{spec.part}_onnx"] = str(export_onnx(
            graph, spec, out / f"tinyvae_{spec.part}.onnx", meta, opset))
        files[f"{spec.part}_torchscript"] = str(export_torchscript(
            graph, spec, out / f"tinyvae_{spec.part}.torchscript.pt", meta))
    diffs = check_parity(vae, files, images)
    # the weights alone, with the architecture in the metadata: MinimalVAE.from_pretrained(path)
    weights = str(save_pretrained(vae, out / "tinyvae.safetensors"))
    return ExportResult(files, diffs, metadata, images.shape[0], weights_file=weights)
