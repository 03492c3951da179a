"""``hrm-vision export``: ONNX and TorchScript graphs (image ``(N, C, H, W)`` float32 in [0, 1],
RGB, NCHW <-> posterior mean ``(N, L, H/8, W/8)``, or a compact model's ``(N, L)`` of its fixed
crop) checked against eager PyTorch, fp16 and int8 variants, the weights and ``export.json``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import io
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._version import __version__
from .compact import CompactVAE
from .data import PHOTOS, VAL_PHOTOS, load_photo, read_image, validation_images
from .io import (
    ADAPTER_ROLE,
    FolderLock,
    FolderLockedError,
    atomic_write,
    load_checkpoint,
    model_from_payload,
    roles_in,
    save,
    write_text,
)
from .metrics import psnr
from .timing import timings
from .vae import LatentAdapter, VAEBase, model_name

#: Largest absolute difference allowed between an fp32 export and the eager model.
PARITY_TOLERANCE = 1e-4
#: Default ONNX opset (ONNX Runtime >= 1.14, TensorRT >= 8.6).
DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16", "int8")
#: Weight names of the linear patch path, whose convolutions stay float32 in fp16 and int8 graphs.
FP32_WEIGHTS = (".patches.", ".linear.")
#: int8 activation ranges: this percentile of each activation's calibration values (and 100 - it).
CALIBRATION_PERCENTILE = 99.99
#: Calibration frames (height, width) and the magnifications of each training photograph.
CALIBRATION_SIZE = (128, 160)
CALIBRATION_ZOOMS = (1.0, 2.0, 4.0)
#: Frame size (height, width) of the cost check, and the largest cost (dB against eager fp32) a
#: graph may have there before the export refuses it.
COST_SIZE = (400, 640)
MAX_COST_DB = 0.5
#: Frame sizes (height, width) every export can be checked at: crops, a 224 crop, a VGA frame.
PARITY_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (64, 64), (224, 224), (480, 640))
#: Names an export writes; anything else found in the target is carried over unchanged.
EXPORT_NAME = re.compile(r"^(tinyvae.*\.(onnx|torchscript\.pt|safetensors)|export\.json)$")

Runner = Callable[[Tensor], Tensor]


class ExportError(RuntimeError):
    """An export that could not be produced or does not match the eager model."""


class VAEGraph(nn.Module):
    """``"encoder"`` (image -> latent), ``"decoder"`` (latent -> image) or
    ``"encoder_teacher_space"`` (image -> ``adapter(encoder(image))``) of a copy of ``vae``
    without its unused half."""

    def __init__(self, vae: VAEBase, part: str, adapter: nn.Module | None = None) -> None:
        super().__init__()
        if (part == "encoder_teacher_space") != (adapter is not None):
            raise ValueError("an adapter goes with the encoder_teacher_space graph, and only there")
        self.encodes = part != "decoder"
        self.vae = copy.deepcopy(vae).eval()
        setattr(self.vae, "decoder" if self.encodes else "encoder", nn.Identity())
        self.adapter = nn.Identity() if adapter is None else copy.deepcopy(adapter).eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.vae.encode(x) if self.encodes else self.vae.decode(x))


@dataclass(frozen=True)
class GraphSpec:
    """Names and example shapes (without the batch) of one graph; ``fixed_size`` is a compact
    model's crop side (only the batch dynamic), None for any side divisible by 8."""

    part: str  # "encoder", "decoder" or "encoder_teacher_space"
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    fixed_size: int | None = None

    def metadata(self, vae: VAEBase, source: str,
                 adapter_arch: dict[str, int] | None = None) -> dict[str, str]:
        """The ``metadata_props`` of the ONNX file and ``metadata.json`` of the TorchScript file."""
        s = self.fixed_size
        image, grid = ", height, width", ", height/8, width/8"
        if s is not None:
            image, grid = f", {s}, {s}", ""
        encodes = self.part != "decoder"
        latent = (self.output_shape if encodes else self.input_shape)[0]
        meta = {
            "producer": f"hrm_vision {__version__}",
            "graph": f"{model_name(vae) if s else 'tinyvae'} {self.part}",
            "input": f"{self.input_name} [batch, {self.input_shape[0]}"
                     f"{image if encodes else grid}] float32",
            "output": f"{self.output_name} [batch, {self.output_shape[0]}"
                      f"{grid if encodes else image}] float32",
            "image_range": "[0, 1] (float32; divide uint8 pixels by 255)",
            "color_order": "RGB" if vae.in_channels == 3 else "grey (one channel)",
            "layout": "NCHW",
            "image_size": "any height and width divisible by 8 (dynamic)"
            if s is None else f"{s}x{s} (fixed)",
            "latent_shape": f"[batch, {latent}{grid}]",
            "latent": "posterior mean (deterministic)",
            "arch": json.dumps(vae.arch_config()),
            "source_checkpoint": source,
        }
        if self.part == "encoder_teacher_space":
            meta["latent"] = ("the latent adapter applied to the posterior mean: the student's "
                              "latent in the teacher's latent space (deterministic)")
            meta["adapter_arch"] = json.dumps(adapter_arch or {})
        return meta


def graph_specs(vae: VAEBase, image_size: int, teacher_dim: int | None = None
                ) -> tuple[GraphSpec, ...]:
    """Encoder and decoder specs for square images of side ``image_size`` (a compact model's
    crop side for one), and the teacher-space encoder's when ``teacher_dim`` is given."""
    fixed = vae.image_size if isinstance(vae, CompactVAE) else None
    if fixed is not None and image_size != fixed:
        raise ValueError(f"the {model_name(vae)} graphs take {fixed}x{fixed} crops only, "
                         f"not {image_size}x{image_size}")
    latent = vae.latent_shape(image_size, image_size)
    image = (vae.in_channels, image_size, image_size)
    specs = (GraphSpec("encoder", "image", image, "latent", latent, fixed),
             GraphSpec("decoder", "latent", latent, "image", image, fixed))
    if teacher_dim is None:
        return specs
    return (*specs, GraphSpec("encoder_teacher_space", "image", image, "teacher_latent",
                              (teacher_dim, *latent[1:]), fixed))


def export_onnx(graph: nn.Module, spec: GraphSpec, path: Path, metadata: dict[str, str],
                opset: int = DEFAULT_OPSET) -> Path:
    """``graph`` as ONNX at ``path`` with ``metadata``: symbolic batch and (unless
    ``spec.fixed_size``) ``latent_height``/``latent_width``, ``8*`` them for images."""
    example = torch.rand(2, *spec.input_shape)  # torch.export specialises sizes 0 and 1
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
    if spec.fixed_size is None:  # the example's latent grid is at least 2x2, as the batch
        h, w = (torch.export.Dim(f"latent_{side}", min=1, max=4096) for side in ("height", "width"))
        dims.update({2: h, 3: w} if spec.part == "decoder" else {2: h * 8, 3: w * 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in onnxscript)
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, verbose=False,
                                    input_names=[spec.input_name],
                                    output_names=[spec.output_name],
                                    dynamic_shapes=(dims,), opset_version=opset)
    assert program is not None  # dynamo=True always gives a program
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return atomic_write(path, lambda f: f.write(model.SerializeToString()))


def ort_session(path: str | os.PathLike[str], threads: int | None = None
                ) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimisations (``threads`` intra-op threads)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: Tensor) -> Tensor:
    """The output of a one-input, one-output session on ``x``."""
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(out))


def export_torchscript(graph: nn.Module, spec: GraphSpec, path: Path,
                       metadata: dict[str, str]) -> Path:
    """``graph`` traced (``torch.jit.trace``) at ``path``, with ``metadata.json``; any size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        traced = torch.jit.trace(graph.eval(), torch.rand(2, *spec.input_shape))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """An exported TorchScript file, on the CPU, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval()


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"int8,fp16"`` -> ``("fp32", "fp16", "int8")`` (fp32 always, first); ``ValueError``
    naming an unknown one."""
    asked = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = sorted(set(asked) - set(PRECISIONS))
    if unknown or not asked:
        raise ValueError(f"unknown precision {', '.join(unknown) or repr(text)}; choose from "
                         f"{', '.join(PRECISIONS)} (comma-separated)")
    return tuple(p for p in PRECISIONS if p in asked or p == "fp32")


def precision_path(fp32_path: str | os.PathLike[str], precision: str) -> Path:
    """Where a variant of an fp32 graph goes: ``x.onnx`` -> ``x.int8.onnx``."""
    path = Path(fp32_path)
    return path if precision == "fp32" else path.with_suffix(f".{precision}.onnx")


def _linear_path_convs(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and any(tag in name for name in n.input for tag in FP32_WEIGHTS)]


def _int8_float_convs(model: onnx.ModelProto) -> list[str]:
    """The convolutions int8 leaves in float32: the linear patch path, and the one reading the
    latent (up to ~30 on one uint8 scale: 8 dB lost, experiments/int8_frames.py)."""
    return _linear_path_convs(model) + [n.name for n in model.graph.node
                                        if n.op_type == "Conv" and "latent" in n.input]


def _linear_path_adds(model: onnx.ModelProto) -> list[str]:
    """The additions joining the linear patch path (into the latent, the image: on one uint8
    scale they lost 13 dB), found back from each input through reshapes to its convolution."""
    made_by, linear = {o: n for n in model.graph.node for o in n.output}, _linear_path_convs(model)

    def linear_path(name: str) -> bool:
        node = made_by.get(name)
        while node is not None and node.op_type != "Conv":
            node = made_by.get(node.input[0])
        return node is not None and node.name in linear

    return [n.name for n in model.graph.node if n.op_type == "Add" and any(map(linear_path,
                                                                               n.input))]


def _save_variant(model: onnx.ModelProto, fp32: onnx.ModelProto, precision: str,
                  path: Path) -> Path:
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in fp32.metadata_props},
                                        "precision": precision})
    return atomic_write(path, lambda f: f.write(model.SerializeToString()))


def to_fp16(fp32_path: str | os.PathLike[str]) -> Path:
    """The float16 variant of an fp32 graph (the linear patch path in float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    half = convert_float_to_float16(model, keep_io_types=True,
                                    node_block_list=_linear_path_convs(model))
    return _save_variant(half, model, "fp16: float16, the linear patch path in float32",
                         precision_path(fp32_path, "fp16"))


def to_int8(fp32_path: str | os.PathLike[str], calibration: Tensor) -> Path:
    """The statically quantised (QDQ) variant of an fp32 graph: the nonlinear stages'
    convolutions, ReLUs and residual additions. ``calibration``: real inputs of the graph, ``(N,
    C, H, W)`` (a compact decoder's ``(N, L)``) float32, e.g. the encoder's
    :func:`calibration_frames` and the decoder's their latents, read one at a time."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(fp32_path))
    batches = iter(calibration.float().split(1))
    name = model.graph.input[0].name

    class Reader(q.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {name: batch.numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantised = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator's progress chatter
            q.quantize_static(str(prepared), str(quantised), Reader(),
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              op_types_to_quantize=["Conv", "Relu", "Add"],
                              nodes_to_exclude=_int8_float_convs(graph) + _linear_path_adds(graph),
                              calibrate_method=q.CalibrationMethod.Percentile,
                              extra_options={"ActivationSymmetric": False,
                                             "CalibPercentile": CALIBRATION_PERCENTILE})
        int8 = onnx.load(str(quantised))
    return _save_variant(int8, model, "int8: static QDQ, per-channel int8 weights, uint8 "
                         "activations calibrated on frames", precision_path(fp32_path, "int8"))


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)`` (height first); sides positive multiples of 8."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size is HEIGHTxWIDTH, e.g. 480x640; got {text!r}") from None
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"frame sides must be positive multiples of 8, got {height}x{width}")
    return height, width


def cover(img: Tensor, height: int, width: int, zoom: float = 1.0) -> Tensor:
    """``img`` ``(1, C, H, W)`` resized (antialiased bilinear) to cover ``height`` x ``width``
    magnified by ``zoom``, then centre-cropped to it: ``(C, height, width)`` in [0, 1]."""
    scale = zoom * max(height / img.shape[2], width / img.shape[3])
    size = (max(height, round(img.shape[2] * scale)), max(width, round(img.shape[3] * scale)))
    img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return img[0, :, top:top + height, left:left + width].clamp(0, 1)


def _photo(name: str) -> Tensor:  # (1, 3, H, W) in [0, 1]
    return torch.from_numpy(load_photo(name)).permute(2, 0, 1)[None].float() / 255.0


def photo_frames(height: int, width: int) -> Tensor:
    """The ``photos`` validation photographs as ``(N, 3, height, width)`` frames in [0, 1], RGB,
    each resized to cover the frame, then centre-cropped. Needs the ``photos`` extra."""
    return torch.stack([cover(_photo(name), height, width) for name in VAL_PHOTOS]).contiguous()


def calibration_frames(height: int, width: int,
                       zooms: tuple[float, ...] = CALIBRATION_ZOOMS) -> Tensor:
    """What a camera sees: ``(N, 3, height, width)`` in [0, 1], RGB; per training photograph of
    ``photos`` the whole of it covering the frame at each of ``zooms`` (centre crops) and its
    flattest window at full resolution (sky, walls: the crop sampler rejects such regions)."""
    frames = []
    for name in (p for p in PHOTOS if p not in VAL_PHOTOS):
        img = _photo(name)
        frames += [cover(img, height, width, zoom) for zoom in zooms]
        if img.shape[2] >= height and img.shape[3] >= width:  # the window of least variation
            windows = img[0].unfold(1, height, height // 2).unfold(2, width, width // 2)
            flat = windows.std(dim=(-1, -2)).mean(0).flatten().argmin()
            frames.append(windows.flatten(1, 2)[:, flat].clone())
    return torch.stack(frames).contiguous()


def generated_frames(height: int, width: int) -> Tensor:
    """Camera frames of no photograph, ``(4, 3, height, width)`` in [0, 1], RGB, 1/255 steps,
    seeded noise of 1/255: sky (vertical gradient), wall, horizon (over ground), dusk (diagonal)."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    sky = torch.stack([0.35 + 0.4 * y, 0.55 + 0.3 * y, 0.95 - 0.1 * y])
    wall = torch.tensor([0.7, 0.65, 0.55])[:, None, None] * (0.9 + 0.15 * x - 0.1 * y)
    ground = F.interpolate(torch.rand(1, 3, max(1, height // 8), max(1, width // 8), generator=g),
                           size=(height, width), mode="bilinear", align_corners=False)[0]
    ground = 0.2 + 0.3 * ground * torch.tensor([0.8, 1.0, 0.5])[:, None, None]
    t = (x + y) / 2
    frames = torch.stack([sky, wall, torch.where(y < 0.45, sky, ground),
                          torch.stack([0.9 - 0.5 * t, 0.5 - 0.3 * t, 0.3 + 0.3 * t])])
    noisy = frames + torch.randn(frames.shape, generator=g) / 255
    return (noisy.clamp(0, 1) * 255).round() / 255


def folder_frames(folder: str | os.PathLike[str], height: int, width: int) -> Tensor:
    """The pictures of ``folder`` (name order) as :func:`cover` frames ``(N, 3, height, width)``."""
    files = sorted(f for f in Path(folder).iterdir()
                   if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
    if not files:
        raise ValueError(f"no pictures (.png, .jpg, ...) in {folder}")
    return torch.stack([cover(torch.from_numpy(read_image(f)).permute(2, 0, 1)[None], height,
                              width) for f in files]).contiguous()


def size_key(images: Tensor) -> str:
    """``"HxW"`` of an ``(N, C, H, W)`` batch."""
    return f"{images.shape[-2]}x{images.shape[-1]}"


def eager_runner(vae: VAEBase, part: str = "encode") -> Runner:
    """``vae.encode`` or ``vae.decode`` (``part``) of an eval-mode copy, weights and inputs
    channels-last; contiguous outputs equal the default path up to float rounding."""
    if part not in ("encode", "decode"):
        raise ValueError(f"part must be one of ('encode', 'decode'), got {part!r}")
    fn = getattr(copy.deepcopy(vae).eval().to(memory_format=torch.channels_last), part)

    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:  # a compact model's vector latent (N, L) has no layout
        return fn(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4
                  else x).contiguous()

    return run


def onnx_runner(path: str | os.PathLike[str], threads: int | None = None) -> Runner:
    """An ONNX Runtime CPU session of ``path`` as a runner."""
    session = ort_session(path, threads)
    return lambda x: run_onnx(session, x)


def chain(first: Runner, second: Runner) -> Runner:
    """``second(first(x))``: an encoder then a decoder is a round trip."""
    return lambda x: second(first(x))


@torch.inference_mode()
def check_parity(vae: VAEBase, files: Mapping[str, str], images: Tensor,
                 adapter: nn.Module | None = None) -> dict[str, float]:
    """Largest absolute difference of each of ``files`` (``{f"{part}_{onnx|torchscript}":
    path}``) against eager ``vae`` (and ``adapter``) on ``images`` ``(N, C, H, W)`` in [0, 1];
    ``ExportError`` naming the files beyond :data:`PARITY_TOLERANCE`."""
    vae = vae.eval()
    latent = vae.encode(images)
    reference = {"encoder": (images, latent), "decoder": (latent, vae.decode(latent))}
    if adapter is not None:
        reference["encoder_teacher_space"] = (images, adapter.eval()(latent))
    diffs: dict[str, float] = {}
    for key, path in files.items():
        part = key.rsplit("_", 1)[0]
        if part not in reference:
            raise ExportError(f"no eager reference for {key} ({path}): the teacher-space "
                              "encoder needs the adapter")
        x, expected = reference[part]
        got = run_onnx(ort_session(path), x) if key.endswith("onnx") \
            else load_torchscript(path)(x)
        if got.shape != expected.shape:
            raise ExportError(f"{key} ({path}) gives shape {tuple(got.shape)}, eager "
                              f"{tuple(expected.shape)}")
        diffs[key] = float((got - expected).abs().max())
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise ExportError(f"exports differ from eager PyTorch by more than {PARITY_TOLERANCE}: "
                          f"{bad}")
    return diffs


@torch.inference_mode()
def precision_costs(vae: VAEBase, graphs: Mapping[str, Mapping[str, str]],
                    images_by_size: Mapping[str, Tensor]) -> dict[str, dict[str, dict[str, float]]]:
    """``{precision: {"HxW": costs}}`` of ``graphs`` (``{precision: {"encoder": path,
    "decoder": path}}``) against eager fp32: ``encoder_max_abs_err``, ``decoder_max_abs_err``
    (on the eager latent), ``roundtrip_max_abs_err``, ``psnr_db`` (round trip vs input, pooled),
    ``eager_psnr_db`` and the PSNR costs (eager minus graph; positive is a loss) of the round
    trip, ``psnr_cost_db``, and of each graph alone (the other half eager), ``encoder_cost_db``
    and ``decoder_cost_db``."""
    vae = vae.eval()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for precision, files in graphs.items():
        enc, dec = ort_session(files["encoder"]), ort_session(files["decoder"])
        out[precision] = {}
        for key, x in images_by_size.items():
            z, z_graph = vae.encode(x), run_onnx(enc, x)
            x_hat, roundtrip, decoded = vae.decode(z), run_onnx(dec, z_graph), run_onnx(dec, z)
            eager_db, graph_db = psnr(x_hat, x), psnr(roundtrip, x)
            out[precision][key] = {
                "encoder_max_abs_err": float((z_graph - z).abs().max()),
                "decoder_max_abs_err": float((decoded - x_hat).abs().max()),
                "roundtrip_max_abs_err": float((roundtrip - x_hat).abs().max()),
                "psnr_db": graph_db, "eager_psnr_db": eager_db,
                "psnr_cost_db": eager_db - graph_db,
                "encoder_cost_db": eager_db - psnr(vae.decode(z_graph), x),
                "decoder_cost_db": eager_db - psnr(decoded, x)}
    return out


@torch.inference_mode()
def cost_check(vae: VAEBase, graphs: Mapping[str, Mapping[str, str]],
               frames: Mapping[str, Tensor], max_cost_db: float = MAX_COST_DB
               ) -> dict[str, dict[str, Any]]:
    """:func:`precision_costs` on each collection of ``frames`` (``{name: (N, C, H, W)}``), each
    precision's worst costs and whether within ``max_cost_db``; else ``ExportError`` naming it."""
    out: dict[str, dict[str, Any]] = {}
    for precision, costs in precision_costs(vae, graphs, frames).items():
        worst = {k: max(c[f"{k}_cost_db"] for c in costs.values()) for k in ("encoder", "decoder")}
        worst["roundtrip"] = max(c["psnr_cost_db"] for c in costs.values())
        out[precision] = {"costs_db": costs, "max_cost_db": worst, "threshold_db": max_cost_db,
                          "passed": all(v <= max_cost_db for v in worst.values())}
        if not out[precision]["passed"]:
            part = max(("encoder", "decoder"), key=lambda k: worst[k])
            where = max(costs, key=lambda n: costs[n][f"{part}_cost_db"])
            raise ExportError(
                f"{Path(graphs[precision][part]).name} costs {worst[part]:.3f} dB ({precision} "
                f"round trip {worst['roundtrip']:.3f} dB) against fp32 on the {where} frames, over "
                f"--max-cost-db {max_cost_db:g}: not written (--max-cost-db inf waives the check)")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, EXCHANGE


def _check_target(target: Path) -> None:
    """``OSError`` if ``target`` exists and is not a folder, or holds a subfolder or a link."""
    if not target.exists():
        return
    if not target.is_dir():
        raise NotADirectoryError(f"--out-dir {target} is not a folder")
    odd = sorted(p.name for p in target.iterdir() if not p.is_file() or p.is_symlink())
    if odd:
        raise IsADirectoryError(
            f"{target} holds {', '.join(odd[:5])}, which an export would not keep "
            "(subfolders, links); export into an empty folder or a previous export's")


@contextlib.contextmanager
def export_set(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A locked staging folder beside ``target``, swapped with it when the ``with`` block ends
    without an exception. A failure, an interrupt or a SIGTERM (exit 143) leaves the target as
    it was; a SIGKILL leaves the folder to the next export. The target's other files and its
    permissions are kept; an ``OSError`` names a staged file at its final place; a target that
    is not a folder or holds a subfolder or a link is refused first."""
    target = Path(target)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(target)
    folder = target.parent / f".{target.name}.{secrets.token_hex(4)}.export"
    folder.mkdir()  # not mkdtemp: that makes the folder 0o700 whatever the umask
    lock = FolderLock(folder, purpose="exporting").acquire()
    previous = None
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def stop(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(143)  # 128 + SIGTERM, as the trainer

        previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield folder
        _check_target(target)
        if target.exists():
            shutil.copymode(target, folder)
            for entry in target.iterdir():  # the user's files: kept as they are
                if not EXPORT_NAME.match(entry.name) and entry.name != FolderLock.NAME \
                        and not (folder / entry.name).exists():
                    try:
                        os.link(entry, folder / entry.name)
                    except OSError:
                        shutil.copy2(entry, folder / entry.name)
            if not _exchange(folder, target):  # not atomic: a moment with no target
                old = target.parent / f"{folder.name}.old"
                os.replace(target, old)
                os.replace(folder, target)
                os.replace(old, folder)
        else:
            os.replace(folder, target)
        with contextlib.suppress(FileNotFoundError):
            (target / FolderLock.NAME).unlink()
    except OSError as exc:
        message = str(exc.strerror or exc)
        if str(folder) not in message:
            raise
        message = message.replace(str(folder), str(target))
        raise (type(exc)(exc.errno, message) if exc.errno is not None
               else type(exc)(message)) from exc
    finally:  # the staging folder, or the old set now in its place
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()


def remove_stale_stages(target: Path) -> list[Path]:
    """Delete and return the staging folders of killed exports into ``target`` (lock free)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.export$")
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        if not (pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        try:
            with FolderLock(entry, purpose="cleaning up"):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        except (FolderLockedError, OSError):
            continue  # a live export's
    return sorted(removed)


@dataclass
class ExportResult:
    """What ``export.json`` holds: the files and how they compare with the eager model."""

    files: dict[str, str]
    max_abs_diff: dict[str, float]
    metadata: dict[str, dict[str, str]]
    num_images: int
    exporter: str = "torch.onnx.export(dynamo=True)"
    #: encode+decode images/s per runtime (median, interleaved)
    throughput_ips: dict[str, float] = field(default_factory=dict)
    throughput_batch: int = 0
    weights_file: str = ""
    #: fp32 files against eager at every checked frame size: ``{"HxW": {file key: max diff}}``
    parity_sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``{precision: {"encoder": path, "decoder": path}}``, fp32 included
    precision_files: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ``{precision: {"HxW": errors and PSNR cost}}``, see :func:`precision_costs`
    precision_costs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: single-frame encode+decode latency per runtime
    frame_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    frame_size: str = ""
    threads: int = 1
    #: each precision's costs on frames of collections other than the calibration's, the gate
    cost_check: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: str = ""  #: what the int8 graphs were calibrated on


def export_model(vae: VAEBase, out_dir: str | os.PathLike[str], images: Tensor,
                 source: str = "", opset: int = DEFAULT_OPSET,
                 adapter: LatentAdapter | None = None, precisions: tuple[str, ...] = ("fp32",),
                 calibration: Tensor | None = None,
                 parity_images: Mapping[str, Tensor] | None = None, timing_repeats: int = 0,
                 frame: Tensor | None = None, frame_repeats: int = 0,
                 cost_frames: Mapping[str, Tensor] | None = None, max_cost_db: float = MAX_COST_DB
                 ) -> ExportResult:
    """Export, check and time ``vae`` into ``out_dir`` as one set (:func:`export_set`);
    ``ExportError`` (nothing written) when a file differs from eager or a graph costs more than
    ``max_cost_db`` on ``cost_frames`` (``{collection: (N, C, H, W)}``; default
    :func:`generated_frames`). ``images``: real ``(N, C, S, S)`` in [0, 1] for parity and timing;
    ``adapter`` adds the teacher-space encoder; ``parity_images``: ``{"HxW": (N, C, H, W)}``;
    ``"int8"`` needs ``calibration`` (:func:`calibration_frames`); ``frame`` ``(1, C, H, W)``:
    single-frame latency of eager and each precision."""
    specs = graph_specs(vae, images.shape[-1], adapter and adapter.teacher_dim)
    latent_channels = specs[0].output_shape[0]
    if adapter is not None and adapter.student_dim != latent_channels:
        raise ExportError(f"the adapter reads {adapter.student_dim} latent channels, the model "
                          f"writes {latent_channels}: they do not belong together")
    if "int8" in precisions and calibration is None:
        raise ExportError("the int8 graphs need calibration images (real training images)")
    if cost_frames is None:  # a grey model: the frames' red channel
        g = generated_frames(*((vae.image_size,) * 2 if isinstance(vae, CompactVAE) else COST_SIZE))
        cost_frames = {f"generated {size_key(g)}": g[:, :vae.in_channels]}
    vae = vae.eval()
    threads = torch.get_num_threads()
    with export_set(out_dir) as out:
        files: dict[str, str] = {}
        metadata: dict[str, dict[str, str]] = {}
        for spec in specs:
            teacher_space = spec.part == "encoder_teacher_space"
            graph = VAEGraph(vae, spec.part, adapter if teacher_space else None)
            meta = metadata[spec.part] = spec.metadata(
                vae, source, adapter.arch_config() if teacher_space and adapter else None)
            files[f"{spec.part}_onnx"] = str(export_onnx(
                graph, spec, out / f"tinyvae_{spec.part}.onnx", meta, opset))
            if not teacher_space:  # TorchScript for the two halves only
                files[f"{spec.part}_torchscript"] = str(export_torchscript(
                    graph, spec, out / f"tinyvae_{spec.part}.torchscript.pt", meta))
        diffs = check_parity(vae, files, images, adapter=adapter)
        parity = {size_key(images): diffs, **{key: check_parity(vae, files, x, adapter=adapter)
                                              for key, x in (parity_images or {}).items()}}
        graphs = {"fp32": {p: files[f"{p}_onnx"] for p in ("encoder", "decoder")}}
        if "fp16" in precisions:
            graphs["fp16"] = {p: str(to_fp16(path)) for p, path in graphs["fp32"].items()}
        if "int8" in precisions and calibration is not None:
            with torch.inference_mode():
                latents = vae.encode(calibration)
            graphs["int8"] = {"encoder": str(to_int8(graphs["fp32"]["encoder"], calibration)),
                              "decoder": str(to_int8(graphs["fp32"]["decoder"], latents))}
        result = ExportResult(
            files, diffs, metadata, images.shape[0],
            weights_file=str(save(vae, out / "tinyvae.safetensors", adapter=adapter)),
            parity_sizes=parity, precision_files=graphs,
            precision_costs=precision_costs(vae, graphs, {size_key(images): images,
                                                          **(parity_images or {})}),
            threads=threads, cost_check=cost_check(vae, graphs, cost_frames, max_cost_db),
            calibration="" if calibration is None else
            f"{len(calibration)} frames {size_key(calibration)} (encoder), their latents (decoder)")
        if timing_repeats:  # encode+decode images/s of each runtime, interleaved
            enc, dec = (onnx_runner(files[f"{p}_onnx"], threads) for p in ("encoder", "decoder"))
            ts_enc, ts_dec = (load_torchscript(files[f"{p}_torchscript"])
                              for p in ("encoder", "decoder"))
            with torch.inference_mode():
                times = timings({"pytorch_eager": lambda: vae.decode(vae.encode(images)),
                                 "onnxruntime": lambda: dec(enc(images)),
                                 "torchscript": lambda: ts_dec(ts_enc(images))},
                                timing_repeats, 2, images.shape[0], "runtimes")
            result.throughput_ips = {k: t["throughput_ips"] for k, t in times.items()}
            result.throughput_batch = images.shape[0]
        if frame is not None and frame_repeats:  # one frame's latency, eager and each precision
            runners = {"pytorch_eager": chain(eager_runner(vae, "encode"),
                                              eager_runner(vae, "decode"))}
            for precision, pair in graphs.items():
                runners[f"onnxruntime_{precision}"] = chain(onnx_runner(pair["encoder"], threads),
                                                            onnx_runner(pair["decoder"], threads))
            result.frame_size = size_key(frame)
            times = timings({k: partial(f, frame) for k, f in runners.items()}, frame_repeats,
                            desc=f"frame {result.frame_size}")
            result.frame_latency = {k: {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                                        "fps": t["throughput_ips"]} for k, t in times.items()}
        # the report names each file at its final place
        text = json.dumps(asdict(result), indent=2).replace(
            json.dumps(str(out))[1:-1], json.dumps(str(Path(out_dir)))[1:-1])
        write_text(text + "\n", out / "export.json")
    return ExportResult(**json.loads(text))


def _tensorrt(vae: VAEBase, teacher_space: bool) -> str:
    """The ``trtexec`` commands for the exported files, with their shape profiles."""
    lat = vae.latent_dim
    if isinstance(vae, CompactVAE):
        side, c = vae.image_size, vae.in_channels
        head = f"fixed {side}x{side} crops, dynamic batch from 1 (min, opt) to 64 (max)"
        shapes = [{"image": f"{n}x{c}x{side}x{side}", "latent": f"{n}x{lat}"} for n in (1, 1, 64)]
    else:
        head = ("dynamic batch, height and width, profile from a 32x32 crop (min) through a "
                "480x640 frame (opt) to four 1080x1920 frames (max)")
        shapes = [{"image": f"{n}x3x{h}x{w}", "latent": f"{n}x{lat}x{h // 8}x{w // 8}"}
                  for n, h, w in ((1, 32, 32), (1, 480, 640), (4, 1080, 1920))]

    def trtexec(graph: str, engine: str, tensor: str, flags: str = "--fp16") -> str:
        profile = " ".join(f"--{k}Shapes={tensor}:{p[tensor]}"
                           for k, p in zip(("min", "opt", "max"), shapes, strict=True))
        return (f"  trtexec --onnx=tinyvae_{graph}.onnx --saveEngine=tinyvae_{engine}.engine "
                f"{flags} \\\n          {profile}")

    lines = [f"TensorRT on a Jetson (NOT run here; no TensorRT on this machine), with the files "
             f"above; {head}:", trtexec("encoder", "encoder_fp16", "image"),
             trtexec("decoder", "decoder_fp16", "latent"),
             "  int8 from the calibrated QDQ graph (explicit quantisation; same shapes):",
             trtexec("encoder.int8", "encoder_int8", "image", "--int8 --fp16")]
    if teacher_space:
        lines.append(trtexec("encoder_teacher_space", "encoder_teacher_space_fp16", "image"))
    return "\n".join(lines)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Export the TinyVAE to ONNX and "
                                "TorchScript, checked against eager PyTorch on real images.")
    add = p.add_argument
    add("--checkpoint", default="checkpoints/tinyvae_best.pth",
        help="checkpoint holding the student (default %(default)s)")
    add("--role", default="student", help="model role in the checkpoint (default %(default)s)")
    add("--out-dir", default="exports", help="output folder (default %(default)s)")
    add("--image-size", type=int, default=None,
        help="side of the parity and timing crops (default 32; a compact model's crop side)")
    add("--precision", default="fp32,int8",
        help="graph precisions, fp32 always (default %(default)s; fp16 is for GPUs: no faster "
             "than fp32 on a CPU)")
    add("--parity-sizes", default="64x64,224x224,480x640",
        help="more frame sizes HxW to check, on the validation photographs (default "
             "%(default)s; '' none)")
    add("--calibration-size", default="128x160",
        help="HxW of the frames calibrating int8: the training photographs whole at zooms 1, 2, "
             "4 and their flattest window (default %(default)s; a compact model: its crop)")
    add("--max-cost-db", type=float, default=MAX_COST_DB,
        help="refuse a graph costing more than this (dB PSNR against fp32) on the cost frames "
             "(default %(default)s; inf waives the check)")
    add("--cost-size", default="400x640",
        help="HxW of the cost frames (default %(default)s; a compact model: its crop)")
    add("--cost-frames", default=None, metavar="FOLDER",
        help="a folder of pictures whose frames the cost check adds to the generated ones "
             "(sky, wall, horizon, dusk) and the validation photographs")
    add("--frame-size", default="480x640",
        help="frame HxW of the single-frame latency of each precision (default %(default)s)")
    add("--frame-repeats", type=int, default=5,
        help="rounds of the single-frame latency; 0 skips it (default 5)")
    add("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (18)")
    add("--dataset", default="photos", help="dataset whose validation images check parity")
    add("--data-dir", default="./data", help="dataset root (if it needs one)")
    add("--num-images", type=int, default=64,
        help="validation images of the parity check and the runtime comparison (default 64)")
    add("--timing-repeats", type=int, default=20,
        help="rounds comparing eager, ONNX Runtime and TorchScript; 0 skips it (default 20)")
    add("--threads", type=int, default=1, help="CPU threads of the timings (default 1)")
    add("--no-teacher-space", action="store_true",
        help="leave out tinyvae_encoder_teacher_space.onnx (written with an adapter)")
    return p


def _run(args: argparse.Namespace) -> tuple[VAEBase, ExportResult]:
    """Load the checkpoint and the images, then :func:`export_model`."""
    torch.set_num_threads(args.threads)
    payload = load_checkpoint(args.checkpoint)
    vae = model_from_payload(payload, args.role, source=args.checkpoint)
    compact = isinstance(vae, CompactVAE)
    size = args.image_size or (vae.image_size if compact else 32)
    graph_specs(vae, size)  # a compact model's crop side only, before loading any image
    adapter = None  # it reads the student's latent: the teacher-space encoder goes with it
    if args.role == "student" and not args.no_teacher_space and ADAPTER_ROLE in roles_in(payload):
        adapter = model_from_payload(payload, ADAPTER_ROLE, source=args.checkpoint)

    def as_model_takes(images: Tensor) -> Tensor:  # a grey model gets the mean of the colours
        return images.mean(1, keepdim=True) if vae.in_channels == 1 else images

    images = as_model_takes(validation_images(args.dataset, args.num_images, size, args.data_dir))
    frames = {} if compact else {f"{h}x{w}": as_model_takes(photo_frames(h, w))
                                 for h, w in args.parity_sizes}
    h, w = (size, size) if compact else args.cost_size
    folders = [args.cost_frames] if args.cost_frames else []
    cost = {f"{name} {h}x{w}": as_model_takes(x) for name, x in [
        ("generated", generated_frames(h, w)), ("photos val", photo_frames(h, w)),
        *((Path(f).name, folder_frames(f, h, w)) for f in folders)]}
    calibration = as_model_takes(calibration_frames(*((size, size) if compact else
                                                      args.calibration_size))) \
        if "int8" in args.precision else None
    frame = None if not args.frame_repeats else images[:1] if compact else \
        as_model_takes(photo_frames(*args.frame_size)[:1])
    result = export_model(
        vae, args.out_dir, images, source=Path(args.checkpoint).name, opset=args.opset,
        adapter=adapter, precisions=args.precision,
        calibration=calibration, parity_images=frames, timing_repeats=args.timing_repeats,
        frame=frame, frame_repeats=args.frame_repeats, cost_frames=cost,
        max_cost_db=args.max_cost_db)
    return vae, result


def _summary(vae: VAEBase, result: ExportResult, args: argparse.Namespace) -> str:
    """What the command prints: files with their parity, runtimes, the TensorRT commands."""
    lines = [f"{key:28s} {path}  max |export - eager| = {result.max_abs_diff[key]:.2e}"
             for key, path in result.files.items()]
    for runtime, ips in result.throughput_ips.items():
        lines.append(f"{runtime:14s} encode+decode batch {result.throughput_batch}: {ips:8.0f} "
                     f"img/s ({ips / result.throughput_ips['pytorch_eager']:.2f}x eager)")
    photos = "" if isinstance(vae, CompactVAE) else " and the validation photographs"
    lines.append(f"parity of every fp32 file checked at {', '.join(result.parity_sizes)} "
                 f"(tolerance {PARITY_TOLERANCE}) on {result.num_images} {args.dataset} "
                 f"validation images{photos}")
    for precision, by_size in result.precision_costs.items():
        for key, c in by_size.items():
            lines.append(f"{precision} {key:>8s}: max |err| encoder {c['encoder_max_abs_err']:.1e}"
                         f" decoder {c['decoder_max_abs_err']:.1e} round trip "
                         f"{c['roundtrip_max_abs_err']:.1e}; PSNR {c['psnr_db']:.2f} dB "
                         f"(cost {c['psnr_cost_db']:+.3f} dB vs eager fp32)")
    for precision, check in result.cost_check.items():
        worst = ", ".join(f"{k} {v:+.3f} dB" for k, v in check["max_cost_db"].items())
        lines.append(f"{precision} cost check on {', '.join(check['costs_db'])}: worst {worst} "
                     f"(at most {check['threshold_db']:g} dB): passed")
    for runtime, t in result.frame_latency.items():
        lines.append(f"{runtime:24s} encode+decode one {result.frame_size} frame: "
                     f"{t['median_ms']:8.1f} ms ({t['fps']:5.2f} fps), {result.threads} thread(s)")
    lines.append(f"report: {Path(args.out_dir) / 'export.json'}")
    lines.append(_tensorrt(vae, "encoder_teacher_space_onnx" in result.files))
    return "\n".join(lines)


def command(argv: list[str] | None = None, prog: str = "hrm-vision export") -> int:
    """Export and check; returns 0, or 1 when an export differs from eager. A bad option exits
    with 2; a bad checkpoint, dataset or unwritable file raises ``ValueError`` or ``OSError``."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.timing_repeats < 0 or args.frame_repeats < 0 or args.num_images < 1 \
            or args.threads < 1 or not args.max_cost_db >= 0:
        parser.error("--timing-repeats, --frame-repeats and --max-cost-db must be >= 0, "
                     "--num-images and --threads >= 1")
    if args.image_size is not None and (args.image_size < 8 or args.image_size % 8):
        parser.error(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    try:
        args.precision = parse_precisions(args.precision)
        args.parity_sizes = tuple(parse_size(t) for t in args.parity_sizes.split(",")
                                  if t.strip())
        args.frame_size = parse_size(args.frame_size)
        args.calibration_size = parse_size(args.calibration_size)
        args.cost_size = parse_size(args.cost_size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.cost_frames and not Path(args.cost_frames).is_dir():
        parser.error(f"--cost-frames {args.cost_frames} is not a folder")
    if args.role == ADAPTER_ROLE:
        parser.error("--role must name a VAE (student or teacher); the adapter is exported with "
                     "the student, as tinyvae_encoder_teacher_space.onnx")
    try:
        vae, result = _run(args)
    except ExportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(_summary(vae, result, args))
    return 0
