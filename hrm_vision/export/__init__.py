"""Export the TinyVAE for the edge: ONNX (ONNX Runtime, TensorRT) and TorchScript.

``python -m hrm_vision.export --checkpoint checkpoints/tinyvae_best.pth --out-dir exports``
writes these files and ``export.json``:

- ``tinyvae_encoder.onnx`` / ``tinyvae_encoder.torchscript.pt``: ``image`` ``(N, 3, H, W)``
  float32 in [0, 1], RGB, NCHW -> ``latent`` ``(N, C, H/8, W/8)``, the posterior mean;
- ``tinyvae_decoder.onnx`` / ``tinyvae_decoder.torchscript.pt``: ``latent`` -> ``image`` in
  [0, 1];
- ``tinyvae_encoder_teacher_space.onnx``, when the checkpoint holds the latent adapter (unless
  ``--no-teacher-space``): ``image`` -> ``teacher_latent`` ``(N, teacher_dim, H/8, W/8)``,
  ``adapter(encoder(image))``, the student's latent in the teacher's latent space;
- ``tinyvae_{encoder,decoder}.{fp16,int8}.onnx`` (``--precision``): float16 and int8 variants;
- ``tinyvae.safetensors``: the student's weights (``hrm_vision.load``).

Batch, height and width are dynamic (sides divisible by 8). Modules: :mod:`.graphs` (the
exported graphs, names, metadata), :mod:`.fold` (BatchNorm folded into convolutions),
:mod:`.onnx`, :mod:`.torchscript`, :mod:`.precision` (fp16 and int8 variants), :mod:`.frames`
(real frames at any size), :mod:`.parity` (every export checked against the eager model on real
validation photographs at several frame sizes, largest absolute difference within
``PARITY_TOLERANCE``; each precision's cost; runtime comparison), :mod:`.runtime` (eager and ONNX
Runtime runners), :mod:`.pipeline` (:func:`export_model`), :mod:`.staging` (an export replaces
the previous set whole), and the command in :mod:`.__main__`.
"""

from .fold import fold_batchnorm
from .graphs import PARTS, ExportError, GraphSpec, VAEGraph, graph_specs
from .onnx import DEFAULT_OPSET, export_onnx, ort_session, run_onnx
from .parity import PARITY_TOLERANCE, check_parity, compare_runtimes
from .pipeline import ExportResult, export_model, write_export
from .staging import ExportSet
from .torchscript import export_torchscript, load_torchscript

__all__ = ["DEFAULT_OPSET", "PARITY_TOLERANCE", "PARTS", "ExportError", "ExportResult",
           "ExportSet", "GraphSpec", "VAEGraph", "check_parity", "compare_runtimes", "export_model",
           "export_onnx", "export_torchscript", "fold_batchnorm", "graph_specs",
           "load_torchscript", "ort_session", "run_onnx", "write_export"]
