"""The exported graphs: encoder and decoder halves of a VAE, their names, shapes and metadata."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from torch import Tensor, nn

from .. import __version__
from ..vae import VAEBase


class ExportError(RuntimeError):
    """An export that could not be produced or does not match the eager model."""


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
            "batchnorm": "folded into the convolutions (where there is any)",
            "arch": json.dumps(vae.arch_config()),
            "source_checkpoint": source,
        }


def graph_specs(vae: VAEBase, image_size: int) -> tuple[GraphSpec, GraphSpec]:
    """Encoder and decoder specs for square images of side ``image_size``."""
    latent = vae.latent_shape(image_size, image_size)
    image = (vae.in_channels, image_size, image_size)
    return (GraphSpec("encoder", "image", image, "latent", latent),
            GraphSpec("decoder", "latent", latent, "image", image))
