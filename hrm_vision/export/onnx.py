"""ONNX export (``torch.onnx.export(..., dynamo=True)``) and ONNX Runtime sessions.

The exporter is the ``torch.export``-based one, the default since PyTorch 2.9 (the
TorchScript-based one is deprecated). It gives a clean graph with symbolic batch, height and
width; BatchNorm is folded explicitly before (:mod:`.fold`), so the result does not depend on
the exporter's optimiser.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from ..io import atomic_write
from .graphs import ExportError, GraphSpec

#: Default ONNX opset (supported by ONNX Runtime >= 1.14 and TensorRT >= 8.6).
DEFAULT_OPSET = 18


def export_onnx(graph: nn.Module, spec: GraphSpec, path: Path, metadata: dict[str, str],
                opset: int = DEFAULT_OPSET) -> Path:
    """Export ``graph`` to ONNX at ``path`` with dynamic batch, height and width (only the batch
    for a ``spec.fixed_size`` graph), and ``metadata`` props.

    Height and width are symbolic: ``latent_height`` and ``latent_width`` on the latent grid,
    ``8*latent_height`` and ``8*latent_width`` for images (so any image side divisible by 8 runs).
    """
    example = torch.rand(2, *spec.input_shape)  # batch 2: torch.export specialises sizes 0 and 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    # the example's latent grid must be at least 2x2 (torch.export specialises sizes 0 and 1)
    grid = [torch.export.Dim(f"latent_{side}", min=1, max=4096) for side in ("height", "width")]
    factor = spec.input_scale
    spatial = {2: grid[0] * factor, 3: grid[1] * factor} if factor > 1 else {2: grid[0],
                                                                             3: grid[1]}
    if spec.fixed_size is not None:  # a compact model's crop: only the batch is dynamic
        spatial = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in onnxscript)
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, verbose=False,
                                    input_names=[spec.input_name],
                                    output_names=[spec.output_name],
                                    dynamic_shapes=({0: batch, **spatial},), opset_version=opset)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for the {spec.part}")
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = (f"hrm_vision {metadata['graph']}: {metadata['input']} -> "
                        f"{metadata['output']}; images in [0, 1], "
                        f"{metadata['color_order']}, NCHW")
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


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
