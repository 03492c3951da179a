"""Named model registry (CompressAI style) and a multiply-accumulate counter."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .base import VAEBase
from .compact import CompactStudentVAE, CompactTeacherVAE
from .models import MinimalVAE, TeacherVAE

#: Architecture names stored in checkpoints, mapped to their classes.
MODELS: dict[str, type[VAEBase]] = {"teacher": TeacherVAE, "tinyvae": MinimalVAE,
                                    "compact_teacher": CompactTeacherVAE,
                                    "compact_student": CompactStudentVAE}


def model_name(model: VAEBase) -> str:
    """The registry name of a model instance (``"teacher"``, ``"tinyvae"``, ...)."""
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model: {sorted(MODELS)}")


def build_model(name: str, **arch: Any) -> VAEBase:
    """Build a registered model from its name and constructor arguments.

    Raises ``ValueError`` naming the choices for an unknown name or argument.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](**arch)
    except TypeError as exc:
        raise ValueError(f"bad architecture arguments for {name!r}: {arch} ({exc})") from exc


@torch.no_grad()
def count_macs(model: VAEBase, height: int = 32, width: int = 32,
               part: str = "both") -> int:
    """Multiply-accumulates for one image of ``height x width`` (``part``: encode/decode/both).

    Counted with PyTorch's own ``FlopCounterMode`` (FLOPs / 2); convolutions and matmuls only,
    normalisations and activations excluded, the same way for every model.
    """
    if part not in ("encode", "decode", "both"):
        raise ValueError(f"part must be 'encode', 'decode' or 'both', got {part!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.rand(1, 3, height, width, device=device)
    z = model.encode(x)
    counter = FlopCounterMode(display=False)
    with counter:
        if part in ("encode", "both"):
            model.encode(x)
        if part in ("decode", "both"):
            model.decode(z)
    model.train(was_training)
    return counter.get_total_flops() // 2
