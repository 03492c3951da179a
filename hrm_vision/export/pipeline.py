"""Both halves of a VAE to ONNX and TorchScript, and the teacher-space encoder to ONNX, folded and
checked, with fp16 and int8 variants of the two halves: :func:`export_model`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..pretrained import save_pretrained
from ..vae import VAEBase
from .fold import fold_batchnorm
from .graphs import ExportError, VAEGraph, graph_specs
from .onnx import DEFAULT_OPSET, export_onnx
from .parity import check_parity, precision_costs, size_key
from .precision import to_fp16, to_int8
from .staging import ExportSet
from .torchscript import export_torchscript

if TYPE_CHECKING:
    from ..vae import LatentAdapter


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
    #: fp32 files against eager at every checked frame size: ``{"HxW": {file key: max diff}}``
    parity_sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``{precision: {"encoder": path, "decoder": path}}``, fp32 included
    precision_files: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ``{precision: {"HxW": errors and PSNR cost}}``, see :func:`precision_costs`
    precision_costs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: single-frame encode+decode latency per runtime, see :func:`frame_latency`
    frame_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    frame_size: str = ""
    threads: int = 1


def export_model(vae: VAEBase, out_dir: str | os.PathLike[str], images: Tensor,
                 source: str = "", opset: int = DEFAULT_OPSET,
                 adapter: LatentAdapter | None = None, precisions: tuple[str, ...] = ("fp32",),
                 calibration: Tensor | None = None,
                 parity_images: dict[str, Tensor] | None = None) -> ExportResult:
    """:func:`write_export` as one set: the files replace ``out_dir``'s previous export whole,
    or (on any failure) nothing changes (:class:`~.staging.ExportSet`). The returned paths are
    in ``out_dir``."""
    with ExportSet(out_dir) as staged:
        result = write_export(vae, staged.folder, images, source, opset, adapter, precisions,
                              calibration, parity_images)
        return staged.relocate(result)


def write_export(vae: VAEBase, out_dir: str | os.PathLike[str], images: Tensor,
                 source: str = "", opset: int = DEFAULT_OPSET,
                 adapter: LatentAdapter | None = None, precisions: tuple[str, ...] = ("fp32",),
                 calibration: Tensor | None = None,
                 parity_images: dict[str, Tensor] | None = None) -> ExportResult:
    """Export encoder and decoder of ``vae`` to ONNX and TorchScript in ``out_dir``, checked,
    and its weights (and the adapter's) to ``tinyvae.safetensors`` (loadable with
    ``MinimalVAE.from_pretrained``; the adapter with ``load_model(path, role="adapter")``).

    ``images``: real (N, 3, S, S) images in [0, 1] (the main parity check and the example).
    ``adapter``: the student-to-teacher :class:`~hrm_vision.vae.LatentAdapter`
    (``student_dim`` equal to the VAE's latent channels C); when given, the teacher-space
    encoder ``tinyvae_encoder_teacher_space.onnx`` is exported too: ``image`` (N, 3, S, S) in
    [0, 1] -> ``teacher_latent`` ``adapter(vae.encode(image))`` (N, teacher_dim, S/8, S/8),
    checked like the others.

    Every graph takes any height and width divisible by 8. ``parity_images``: more real images
    ``{"HxW": (N, 3, H, W)}`` at other frame sizes; every fp32 file is checked at each of them too.
    ``precisions``: besides ``"fp32"``, ``"fp16"`` and ``"int8"`` variants of the encoder and
    decoder (:mod:`.precision`); int8 needs ``calibration``, real training images
    ``(N, 3, S, S)`` in [0, 1] (the decoder is calibrated on their eager latents). Each
    precision's errors and PSNR cost against eager fp32 are measured at every checked size.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square images (N, 3, S, S), got {tuple(images.shape)}")
    latent_channels = vae.latent_shape(images.shape[-1], images.shape[-1])[0]
    if adapter is not None and adapter.student_dim != latent_channels:
        raise ExportError(f"the adapter reads {adapter.student_dim} latent channels, the model "
                          f"writes {latent_channels}: they do not belong together")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folded = fold_batchnorm(vae)
    files: dict[str, str] = {}
    metadata: dict[str, dict[str, str]] = {}
    teacher_dim = None if adapter is None else adapter.teacher_dim
    for spec in graph_specs(vae, images.shape[-1], teacher_dim):
        teacher_space = spec.part == "encoder_teacher_space"
        graph = VAEGraph(folded, spec.part, adapter if teacher_space else None)
        meta = spec.metadata(vae, source, adapter.arch_config() if teacher_space else None)
        metadata[spec.part] = meta
        files[f"{spec.part}_onnx"] = str(export_onnx(
            graph, spec, out / f"tinyvae_{spec.part}.onnx", meta, opset))
        if not teacher_space:  # TorchScript for the two halves only
            files[f"{spec.part}_torchscript"] = str(export_torchscript(
                graph, spec, out / f"tinyvae_{spec.part}.torchscript.pt", meta))
    diffs = check_parity(vae, files, images, adapter=adapter)
    sizes = {size_key(images): images, **(parity_images or {})}
    parity_sizes = {key: check_parity(vae, files, x, adapter=adapter) for key, x in sizes.items()}
    graphs = _precision_variants(vae, files, precisions, calibration)
    costs = precision_costs(vae, graphs, sizes)
    # the weights alone, with the architecture in the metadata: MinimalVAE.from_pretrained(path)
    weights = str(save_pretrained(vae, out / "tinyvae.safetensors", adapter=adapter))
    return ExportResult(files, diffs, metadata, images.shape[0], weights_file=weights,
                        parity_sizes=parity_sizes, precision_files=graphs,
                        precision_costs=costs)


def _precision_variants(vae: VAEBase, files: dict[str, str], precisions: tuple[str, ...],
                        calibration: Tensor | None) -> dict[str, dict[str, str]]:
    """``{precision: {"encoder": path, "decoder": path}}``, the variants written next to the fp32
    graphs."""
    fp32 = {part: files[f"{part}_onnx"] for part in ("encoder", "decoder")}
    graphs = {"fp32": fp32}
    if "fp16" in precisions:
        graphs["fp16"] = {part: str(to_fp16(path)) for part, path in fp32.items()}
    if "int8" in precisions:
        if calibration is None:
            raise ExportError("the int8 graphs need calibration images (real training images)")
        with torch.inference_mode():
            latents = vae.eval().encode(calibration)
        graphs["int8"] = {"encoder": str(to_int8(fp32["encoder"], calibration)),
                          "decoder": str(to_int8(fp32["decoder"], latents))}
    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise ExportError(f"unknown precisions {sorted(unknown)}")
    return graphs
