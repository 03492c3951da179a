"""Reduced-precision ONNX graphs made from the fp32 ones: fp16 and int8.

- **fp16** (:func:`to_fp16`): weights and operators in float16 with float32 inputs and outputs
  (``keep_io_types``), by ONNX Runtime's own converter (``onnxruntime.transformers.float16``),
  except the linear patch path's 1x1 convolutions (:data:`FP32_WEIGHTS`: a few percent of the
  MACs, on the latent grid), which stay float32: whitened coefficients span a range that fp16
  rounds coarsely (on a 480x640 frame this lowers the largest round-trip error from 1.0e-2 to
  8.4e-3 for the small student of ``tests/test_export_precision.py``).
- **int8** (:func:`to_int8`): static quantisation by ONNX Runtime's quantisation tools
  (``onnxruntime.quantization.quantize_static``), QDQ format, int8 weights per output channel,
  uint8 activations whose ranges are calibrated on real training images (the 0.01 and 99.99
  percentiles of each activation: MinMax ranges, stretched by rare outliers, cost a briefly
  trained student 1.62 dB of round-trip PSNR on 224x224 validation frames, these percentiles
  0.22 dB); inputs and outputs stay float32. Only the convolutions of the nonlinear stages are
  quantised (their inputs and weights): the linear patch path and the additions that merge it
  with the stages stay float32. Quantising those too (everything but the linear path) gave a
  data-initialised student's latent a largest error of 3.5 (latent range 25) against 9e-6 for
  this choice, for a 480x640 encoder latency of 389 against 421 ms (fp32 638 ms; one thread,
  loaded 2-core VM, 2026-12-02).

The files sit next to the fp32 graph: ``tinyvae_encoder.fp16.onnx``,
``tinyvae_encoder.int8.onnx`` (see :func:`precision_path`).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from torch import Tensor

from ..io import atomic_write

#: Weight names whose convolutions the fp16 graph keeps in float32 (the linear patch path).
FP32_WEIGHTS = (".patches.", ".linear.")
#: Activation ranges of the int8 graphs: this percentile of each activation's calibration values
#: (and 100 minus it at the bottom).
CALIBRATION_PERCENTILE = 99.99
#: The precisions ``hrm-vision export --precision`` knows, in the order they are written.
PRECISIONS = ("fp32", "fp16", "int8")


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"fp32,int8"`` -> ``("fp32", "int8")`` (fp32 always first: the others are made from it).

    Raises ``ValueError`` naming an unknown precision.
    """
    asked = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = sorted(set(asked) - set(PRECISIONS))
    if unknown or not asked:
        raise ValueError(f"unknown precision {', '.join(unknown) or repr(text)}; choose from "
                         f"{', '.join(PRECISIONS)} (comma-separated)")
    return tuple(p for p in PRECISIONS if p in asked or p == "fp32")


def precision_path(fp32_path: str | os.PathLike[str], precision: str) -> Path:
    """Where the ``precision`` variant of an fp32 graph goes: ``x.onnx`` -> ``x.int8.onnx``."""
    path = Path(fp32_path)
    return path if precision == "fp32" else path.with_suffix(f".{precision}.onnx")


def linear_path_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes of the linear patch path (weights named in :data:`FP32_WEIGHTS`)."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and any(tag in name for name in n.input for tag in FP32_WEIGHTS)]


def _retag(model: onnx.ModelProto, precision: str, note: str) -> onnx.ModelProto:
    props = {p.key: p.value for p in model.metadata_props}
    props["precision"] = f"{precision}: {note}"
    onnx.helper.set_model_props(model, props)
    return model


def to_fp16(fp32_path: str | os.PathLike[str]) -> Path:
    """Write the float16 variant of an fp32 graph; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    model = convert_float_to_float16(model, keep_io_types=True,
                                     node_block_list=linear_path_convs(model))
    out = precision_path(fp32_path, "fp16")
    return _save(_retag(model, "fp16", "float16 weights and arithmetic (the linear patch path in "
                                       "float32), float32 input and output"), out)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` atomically (a failed write is an ``OSError`` naming ``path``)."""
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


def _calibration_reader(input_name: str, batches: list[Tensor]):  # noqa: ANN202
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[Tensor] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch.numpy()}

    return Reader()


def to_int8(fp32_path: str | os.PathLike[str], calibration: Tensor, batch_size: int = 32
            ) -> Path:
    """Write the statically quantised int8 variant of an fp32 graph (QDQ, per-channel weights,
    the nonlinear stages' convolutions only).

    ``calibration``: real inputs of the graph, ``(N, C, H, W)`` float32 (images in [0, 1] for an
    encoder, the eager encoder's latents of those images for a decoder, ``(N, L)`` for a compact
    model's vector latent); the activation ranges
    are percentiles (:data:`CALIBRATION_PERCENTILE`) over all ``N``, fed in batches of
    ``batch_size``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.dim() not in (2, 4) or calibration.shape[0] < 1:
        raise ValueError("calibration inputs must be (N, C, H, W) or vector latents (N, L), got "
                         f"{tuple(calibration.shape)}")
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    out = precision_path(fp32_path, "int8")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and graph cleanup, as the quantiser recommends (the symbolic
        # pass is for transformer graphs; these graphs have plain dynamic sides)
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        reader = _calibration_reader(input_name, list(calibration.float().split(batch_size)))
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator's progress chatter
            quantize_static(str(prepared), str(Path(tmp) / "int8.onnx"), reader,
                            quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                            nodes_to_exclude=linear_path_convs(onnx.load(str(prepared))),
                            calibrate_method=_percentile(),
                            extra_options={"ActivationSymmetric": False,
                                           "CalibPercentile": CALIBRATION_PERCENTILE})
        quantised = onnx.load(str(Path(tmp) / "int8.onnx"))
    quantised.metadata_props.clear()
    for p in model.metadata_props:
        quantised.metadata_props.add(key=p.key, value=p.value)
    return _save(_retag(quantised, "int8", "static QDQ quantisation, int8 per-channel weights, "
                                           "uint8 activations calibrated on training images; "
                                           "float32 input and output"), out)


def _percentile():  # noqa: ANN202
    from onnxruntime.quantization import CalibrationMethod

    return CalibrationMethod.Percentile
