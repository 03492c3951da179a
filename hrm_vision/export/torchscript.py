"""TorchScript export (``torch.jit.trace``) and loading.

``torch.jit.trace`` is deprecated in recent PyTorch, but TorchScript is still the format that
C++ ``torch::jit::load`` and older deployment stacks read.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write
from .graphs import GraphSpec


def export_torchscript(graph: nn.Module, spec: GraphSpec, path: Path,
                       metadata: dict[str, str]) -> Path:
    """Trace ``graph`` to TorchScript at ``path``; ``metadata`` goes in ``metadata.json``."""
    example = torch.rand(2, *spec.input_shape)
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export; the input-shape checks of
        # VAEBase run in Python while tracing and are not recorded: the traced graph takes any
        # size (the export checks it at every parity size).
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph.eval(), example)
        buffer = io.BytesIO()  # written by Python: a full disk is an OSError naming the file
        torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data))


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """Load an exported TorchScript file (on CPU, eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()
