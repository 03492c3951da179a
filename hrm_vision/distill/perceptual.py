"""Frozen perceptual backbones for the ``perceptual`` loss term.

Each backbone maps images in [0, 1], (B, 3, H, W), to a list of feature maps and has no
trainable parameters (gradients still flow through it to the images).

- ``vgg16``: torchvision's VGG16 ImageNet features up to ``relu2_2`` (layers ``relu1_2`` and
  ``relu2_2``; deeper layers are 4x4 or smaller on 32x32 images), with ImageNet normalisation.
  The weights come from a given file, the torch hub cache, or a download when it is allowed.
- ``teacher``: the output of the first block the frozen teacher's encoder runs (the teacher's own
  learned features; needs no download), taken with forward hooks while the encoder runs, which
  stops as soon as that block has run (:class:`TeacherFeatures`). It relies on no attribute of a
  particular model: the blocks are the encoder's children (``nn.ModuleList`` holders expanded,
  modules without parameters such as reshapes and activations left out), and the first to run is
  found by calling the encoder. For ``TeacherVAE`` that block is its first encoder stage, which
  costs about as much as the whole student forward and backward pass; deeper blocks would cost
  several times more.
- ``auto``: ``vgg16`` when its weights are available without a download, else ``teacher``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import VGG16_Weights, vgg16

from ..io import load_checkpoint
from ..vae import VAEBase

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Indices in ``vgg16().features`` of the ReLUs whose outputs are matched (relu1_2, relu2_2).
VGG_LAYERS: tuple[int, ...] = (3, 8)
#: Encoder blocks of the teacher whose outputs are matched (see :func:`encoder_blocks`).
TEACHER_BLOCKS = 1


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class VGG16Features(nn.Module):
    """VGG16 feature maps at ``VGG_LAYERS`` of ImageNet-normalised images.

    Args:
        state_dict: torchvision ``vgg16`` weights (a full state dict, or only the ``features.*``
            keys of the layers used); ``None`` keeps random weights (for tests only).
    """

    def __init__(self, state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.features = vgg16(weights=None).features[: max(VGG_LAYERS) + 1]
        if state_dict is not None:
            prefix = "features."
            own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            needed = set(self.features.state_dict())
            missing = sorted(needed - set(own))
            if missing:
                raise ValueError(f"vgg16 weights lack the layers used by the perceptual loss: "
                                 f"features.{missing[0]} (and {len(missing) - 1} more)")
            self.features.load_state_dict({k: own[k] for k in needed})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        _freeze(self)

    def train(self, mode: bool = True) -> VGG16Features:  # always eval: frozen backbone
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                out.append(x)
        return out


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks: its children in registration order, ``nn.ModuleList`` holders
    expanded, modules without parameters (PixelUnshuffle, activations) left out."""
    blocks: list[nn.Module] = []
    for child in encoder.children():
        if isinstance(child, nn.ModuleList):
            blocks += encoder_blocks(child)
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


class _AllTapped(Exception):
    """Raised by the last hook: the encoder need not run further."""


class TeacherFeatures(nn.Module):
    """Outputs of the first ``blocks`` encoder blocks a frozen teacher VAE runs, in call order.

    ``(B, 3, H, W)`` images in [0, 1] -> a list of ``blocks`` feature maps. The teacher's
    ``encoder`` runs with forward hooks on its blocks (:func:`encoder_blocks`) and stops once
    ``blocks`` of them have run.
    """

    def __init__(self, teacher: VAEBase, blocks: int = TEACHER_BLOCKS) -> None:
        super().__init__()
        self.encoder = _freeze(teacher).encoder
        self.taps = encoder_blocks(self.encoder)
        if len(self.taps) < blocks:
            raise ValueError(f"the teacher's encoder has {len(self.taps)} blocks with "
                             f"parameters, {blocks} needed for the perceptual backbone")
        self.blocks = blocks

    def train(self, mode: bool = True) -> TeacherFeatures:  # always eval: frozen backbone
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            out.append(output)
            if len(out) == self.blocks:
                raise _AllTapped

        handles = [m.register_forward_hook(hook) for m in self.taps]
        try:
            self.encoder(x)
        except _AllTapped:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(out) < self.blocks:
            raise RuntimeError(f"the teacher's encoder ran {len(out)} of its blocks, "
                               f"{self.blocks} needed for the perceptual backbone")
        return out


def hub_vgg16_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights (``$TORCH_HOME/hub/checkpoints``)."""
    filename = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def find_vgg16_weights(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The VGG16 weights file to use without downloading, or ``None`` if there is none.

    An explicit ``path`` must exist (``ValueError`` otherwise); else the torch hub cache is used.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"vgg16_weights: no such file {p}")
        return p
    cached = hub_vgg16_path()
    return cached if cached.is_file() else None


def resolve_backbone(kind: str, vgg16_weights: str | None = None) -> str:
    """``kind`` with ``auto`` resolved: ``vgg16`` when its weights are on disk (``vgg16_weights``
    or the torch hub cache), else ``teacher``; ``vgg16`` and ``teacher`` stay as they are."""
    if kind not in ("auto", "vgg16", "teacher"):
        raise ValueError(f"perceptual_backbone must be auto, vgg16 or teacher, got {kind!r}")
    if kind == "auto":
        return "vgg16" if find_vgg16_weights(vgg16_weights) is not None else "teacher"
    return kind


def build_perceptual(kind: str, teacher: VAEBase | None = None, vgg16_weights: str | None = None,
                     allow_download: bool = False) -> tuple[nn.Module, str]:
    """The backbone for ``kind`` (``auto``, ``vgg16`` or ``teacher``) and the name it resolved to.

    ``vgg16`` without local weights downloads them only when ``allow_download``; otherwise it
    raises a ``ValueError`` saying how to proceed. ``teacher`` needs ``teacher``.
    """
    kind = resolve_backbone(kind, vgg16_weights)
    if kind == "teacher":
        if teacher is None:
            raise ValueError("the teacher perceptual backbone needs a teacher model")
        return TeacherFeatures(teacher), "teacher"
    state: dict[str, Any]
    local = find_vgg16_weights(vgg16_weights)
    if local is not None:
        state = load_checkpoint(local)
    elif allow_download:
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    else:
        raise ValueError(
            f"vgg16 perceptual backbone: no weights at {hub_vgg16_path()} and downloading is not "
            "allowed; pass --download, give --vgg16-weights PATH, or use "
            "--perceptual-backbone teacher (or auto)")
    return VGG16Features(state), "vgg16"
