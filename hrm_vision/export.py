"""Export the TinyVAE for the edge: ONNX (ONNX Runtime, TensorRT) and TorchScript.

``python -m hrm_vision.export --checkpoint checkpoints/tinyvae_best.pth --out-dir exports``
writes four files and ``export.json``:

- ``tinyvae_encoder.onnx`` / ``tinyvae_encoder.torchscript.pt``: ``image`` ``(N, 3, S, S)``
  float32 in [0, 1], RGB, NCHW -> ``latent`` ``(N, C, S/8, S/8)``, the posterior mean;
- ``tinyvae_decoder.onnx`` / ``tinyvae_decoder.torchscript.pt``: ``latent`` -> ``image`` in
  [0, 1].

The batch dimension is dynamic; the image side S is fixed at export (``--image-size``).
BatchNorm is folded into the preceding convolutions (:func:`fold_batchnorm`) before export, so
the graphs hold only Conv, Relu, Add, Resize/Upsample, Split and Sigmoid. Every export is checked
against the eager PyTorch model on real validation photographs (:func:`check_parity`): the
largest absolute difference must stay within ``1e-4``.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter that is
the default since PyTorch 2.9 (the TorchScript-based one is deprecated). It gives a clean graph
with a symbolic ``batch`` dimension; BatchNorm is folded explicitly anyway, so the result does
not depend on the exporter's optimiser (a test checks that no BatchNormalization node remains).
TorchScript files come from ``torch.jit.trace`` (deprecated in recent PyTorch, but still the
format that C++ ``torch::jit::load`` and older deployment stacks read).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import __version__
from .checkpoints import load_model
from .data import build_dataset
from .evaluation.timing import interleaved_timings, summarize_timings
from .vae import VAEBase

#: Largest absolute difference allowed between an export and the eager model.
PARITY_TOLERANCE = 1e-4
#: Default ONNX opset (supported by ONNX Runtime >= 1.14 and TensorRT >= 8.6).
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that could not be produced or does not match the eager model."""


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with each ``BatchNorm2d`` folded into its convolution.

    Every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential`` becomes
    one convolution with the running statistics and affine parameters baked into its weight and
    bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the BatchNorm becomes ``nn.Identity``.
    The input module is not modified. Raises ``ExportError`` if a BatchNorm is left unfolded.
    """
    folded = copy.deepcopy(module).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    left = [name for name, m in folded.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ExportError(f"BatchNorm layers not preceded by a Conv2d cannot be folded: {left}")
    return folded


def _half(vae: VAEBase, drop: str) -> VAEBase:
    """A copy of ``vae`` whose ``drop`` part (``"encoder"``/``"decoder"``) is an ``Identity``,
    so an exported encoder does not carry the decoder's weights, and vice versa."""
    half = copy.deepcopy(vae)
    setattr(half, drop, nn.Identity())
    return half


class EncoderGraph(nn.Module):
    """The exported encoder: ``image`` (N, 3, H, W) in [0, 1] -> ``latent`` (N, C, H/8, W/8)."""

    def __init__(self, vae: VAEBase) -> None:
        super().__init__()
        self.vae = _half(vae, "decoder")

    def forward(self, image: Tensor) -> Tensor:
        return self.vae.encode(image)


class DecoderGraph(nn.Module):
    """The exported decoder: ``latent`` (N, C, h, w) -> ``image`` (N, 3, 8h, 8w) in [0, 1]."""

    def __init__(self, vae: VAEBase) -> None:
        super().__init__()
        self.vae = _half(vae, "encoder")

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent)


@dataclass(frozen=True)
class GraphSpec:
    """Names and shapes of one exported graph (``batch`` is the dynamic dimension)."""

    part: str  # "encoder" or "decoder"
    input_name: str
    input_shape: tuple[int, int, int]  # without the batch dimension
    output_name: str
    output_shape: tuple[int, int, int]

    def metadata(self, vae: VAEBase, source: str) -> dict[str, str]:
        """The ``metadata_props`` stored in the ONNX file and the TorchScript extra file."""
        def shape(s: tuple[int, ...]) -> str:
            return "[batch, " + ", ".join(map(str, s)) + "]"

        latent = self.output_shape if self.part == "encoder" else self.input_shape
        return {
            "producer": f"hrm_vision {__version__}",
            "graph": f"tinyvae {self.part}",
            "input": f"{self.input_name} {shape(self.input_shape)} float32",
            "output": f"{self.output_name} {shape(self.output_shape)} float32",
            "image_range": "[0, 1] (float32; divide uint8 pixels by 255)",
            "color_order": "RGB",
            "layout": "NCHW",
            "latent_shape": shape(latent),
            "latent": "posterior mean (deterministic)",
            "batchnorm": "folded into the convolutions",
            "arch": json.dumps(vae.arch_config()),
            "source_checkpoint": source,
        }


def graph_specs(vae: VAEBase, image_size: int) -> tuple[GraphSpec, GraphSpec]:
    """Encoder and decoder specs for square images of side ``image_size``."""
    latent = vae.latent_shape(image_size, image_size)
    image = (vae.in_channels, image_size, image_size)
    return (GraphSpec("encoder", "image", image, "latent", latent),
            GraphSpec("decoder", "latent", latent, "image", image))


def export_onnx(graph: nn.Module, spec: GraphSpec, path: Path, metadata: dict[str, str],
                opset: int = DEFAULT_OPSET) -> Path:
    """Export ``graph`` to ONNX at ``path`` with a dynamic batch and ``metadata`` props."""
    example = torch.rand(2, *spec.input_shape)  # batch 2: torch.export specialises sizes 0 and 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in onnxscript)
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, verbose=False,
                                    input_names=[spec.input_name],
                                    output_names=[spec.output_name],
                                    dynamic_shapes=({0: batch},), opset_version=opset)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for the {spec.part}")
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = (f"hrm_vision TinyVAE {spec.part}: {metadata['input']} -> "
                        f"{metadata['output']}; images in [0, 1], RGB, NCHW")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_torchscript(graph: nn.Module, spec: GraphSpec, path: Path,
                       metadata: dict[str, str]) -> Path:
    """Trace ``graph`` to TorchScript at ``path``; ``metadata`` goes in ``metadata.json``."""
    example = torch.rand(2, *spec.input_shape)
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export; the input-shape checks of
        # VAEBase are recorded as constants, which is right for a fixed image size.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph.eval(), example)
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(metadata)})
    return path


def ort_session(path: str | os.PathLike[str], threads: int | None = None
                ) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimisations (``threads`` intra-op threads)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: Tensor) -> Tensor:
    """Run a one-input, one-output session on ``x`` and return the output as a tensor."""
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(out))


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """Load an exported TorchScript file (on CPU, eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


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


@torch.inference_mode()
def check_parity(vae: VAEBase, files: dict[str, str], images: Tensor,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, float]:
    """Largest absolute difference of each exported file against the eager ``vae``.

    ``images``: (N, 3, S, S) in [0, 1]. Encoders are fed the images, decoders the eager latents;
    the reference is the un-folded eager model, so the check covers BatchNorm folding too.
    Raises ``ExportError`` naming the files beyond ``tolerance``.
    """
    vae = vae.eval()
    latent = vae.encode(images)
    reference = {"encoder": (images, latent), "decoder": (latent, vae.decode(latent))}
    diffs: dict[str, float] = {}
    for key, path in files.items():
        part = key.split("_")[0]
        x, expected = reference[part]
        got = run_onnx(ort_session(path), x) if key.endswith("onnx") \
            else load_torchscript(path)(x)
        diffs[key] = float((got - expected).abs().max())
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise ExportError(f"exports differ from eager PyTorch by more than {tolerance}: {bad}")
    return diffs


def export_model(vae: VAEBase, out_dir: str | os.PathLike[str], images: Tensor,
                 source: str = "", opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export encoder and decoder of ``vae`` to ONNX and TorchScript in ``out_dir``, checked.

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
    return ExportResult(files, diffs, metadata, images.shape[0])


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


def validation_images(dataset: str, num_images: int, image_size: int,
                      data_dir: str = "./data") -> Tensor:
    """The first ``num_images`` validation images of ``dataset``, (N, 3, S, S) in [0, 1]."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    ds = build_dataset(dataset, "val", image_size=image_size, data_dir=data_dir)
    n = min(num_images, len(ds))  # type: ignore[arg-type]
    return torch.stack([ds[i] for i in range(n)])


TENSORRT_NOTE = """\
TensorRT on a Jetson (NOT run here; no TensorRT on this machine), with the files above:
  trtexec --onnx=tinyvae_encoder.onnx --saveEngine=tinyvae_encoder_fp16.engine --fp16 \\
          --minShapes=image:1x3x{s}x{s} --optShapes=image:8x3x{s}x{s} --maxShapes=image:64x3x{s}x{s}
  trtexec --onnx=tinyvae_decoder.onnx --saveEngine=tinyvae_decoder_fp16.engine --fp16 \\
          --minShapes=latent:1x{c}x{h}x{h} --optShapes=latent:8x{c}x{h}x{h} \\
          --maxShapes=latent:64x{c}x{h}x{h}"""


def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hrm_vision.export",
        description="Export the TinyVAE encoder and decoder to ONNX and TorchScript, checked "
                    "against eager PyTorch on real validation images.")
    parser.add_argument("--checkpoint", default="checkpoints/tinyvae_best.pth",
                        help="checkpoint holding the student (default %(default)s)")
    parser.add_argument("--role", default="student",
                        help="model role inside the checkpoint (default %(default)s)")
    parser.add_argument("--out-dir", default="exports", help="output folder (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="exported image side in pixels, divisible by 8 (default 32)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (18)")
    parser.add_argument("--dataset", default="photos",
                        help="dataset whose validation images check parity (default photos)")
    parser.add_argument("--data-dir", default="./data", help="dataset root (if it needs one)")
    parser.add_argument("--num-images", type=int, default=64,
                        help="validation images used for the parity check and the runtime "
                             "comparison's batch (default 64)")
    parser.add_argument("--timing-repeats", type=int, default=20,
                        help="interleaved rounds comparing eager PyTorch, ONNX Runtime and "
                             "TorchScript throughput; 0 skips it (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the runtime comparison (default 1, as evaluate)")
    return parser


def main(argv: Sequence[str] | None = None) -> ExportResult:
    args = setup_args().parse_args(argv)
    if args.timing_repeats < 0 or args.threads < 1:
        raise ValueError("--timing-repeats must be >= 0 and --threads >= 1")
    torch.set_num_threads(args.threads)
    vae = load_model(args.checkpoint, role=args.role)
    images = validation_images(args.dataset, args.num_images, args.image_size, args.data_dir)
    result = export_model(vae, args.out_dir, images, source=Path(args.checkpoint).name,
                          opset=args.opset)
    if args.timing_repeats:
        result.throughput_ips = compare_runtimes(vae, result.files, images, args.timing_repeats)
        result.throughput_batch = images.shape[0]
    report = Path(args.out_dir) / "export.json"
    report.write_text(json.dumps(asdict(result), indent=2) + "\n")
    for key, path in result.files.items():
        print(f"{key:22s} {path}  max |export - eager| = {result.max_abs_diff[key]:.2e}")
    for runtime, ips in result.throughput_ips.items():
        ratio = ips / result.throughput_ips["pytorch_eager"]
        print(f"{runtime:14s} encode+decode batch {result.throughput_batch}: {ips:8.0f} img/s "
              f"({ratio:.2f}x eager)")
    print(f"parity checked on {result.num_images} {args.dataset} validation images "
          f"(tolerance {PARITY_TOLERANCE}); report: {report}")
    c, h, _ = vae.latent_shape(args.image_size, args.image_size)
    print(TENSORRT_NOTE.format(s=args.image_size, c=c, h=h))
    return result


if __name__ == "__main__":
    main()
