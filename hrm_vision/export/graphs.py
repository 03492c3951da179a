"""The exported graphs: encoder and decoder halves of a VAE, and the encoder followed by the latent
adapter (the teacher-space encoder); their names, shapes and metadata.

A spatial model's graphs take any height and width divisible by 8; a compact model's
(:class:`~hrm_vision.compact.CompactVAE`) take its fixed crop, ``(N, C, S, S)`` images and
``(N, latent_dim)`` latents, with only the batch dynamic (:attr:`GraphSpec.fixed_size`)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from torch import Tensor, nn

from .. import __version__
from ..compact import CompactVAE
from ..vae import VAEBase, model_name


class ExportError(RuntimeError):
    """An export that could not be produced or does not match the eager model."""


#: The parts that can be exported, with the VAE half each one uses.
PARTS = {"encoder": "encode", "decoder": "decode", "encoder_teacher_space": "encode"}


class VAEGraph(nn.Module):
    """One exported graph: a half of a VAE, optionally followed by the latent adapter.

    - ``"encoder"``: ``image`` (N, 3, H, W) in [0, 1] -> ``latent`` (N, C, H/8, W/8), the
      posterior mean;
    - ``"decoder"``: ``latent`` (N, C, h, w) -> ``image`` (N, 3, 8h, 8w) in [0, 1];
    - ``"encoder_teacher_space"``: ``image`` (N, 3, H, W) in [0, 1] ->
      ``adapter(encoder(image))`` (N, teacher_dim, H/8, W/8), the student's latent in the
      teacher's latent space (``adapter`` is required).

    The VAE is copied with the half it does not use replaced by an ``Identity``, so an exported
    encoder does not carry the decoder's weights, and vice versa.
    """

    def __init__(self, vae: VAEBase, part: str, adapter: nn.Module | None = None) -> None:
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"unknown graph {part!r}; known: {sorted(PARTS)}")
        if (part == "encoder_teacher_space") != (adapter is not None):
            raise ValueError("an adapter goes with the encoder_teacher_space graph, and only there")
        self.encodes = PARTS[part] == "encode"
        self.vae = copy.deepcopy(vae)
        setattr(self.vae, "decoder" if self.encodes else "encoder", nn.Identity())
        self.adapter = copy.deepcopy(adapter) if adapter is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.vae.encode(x) if self.encodes else self.vae.decode(x))


@dataclass(frozen=True)
class GraphSpec:
    """Names and example shapes of one exported graph.

    Batch, height and width are dynamic in the exported graph, or only the batch when
    ``fixed_size`` (a compact model's crop side) is set; ``input_shape`` and ``output_shape``
    (without the batch dimension: ``(C, H, W)``, or ``(latent_dim,)`` for a vector latent) are
    those of the export example and of the parity check at the export's ``--image-size``.
    """

    part: str  # a key of PARTS: "encoder", "decoder" or "encoder_teacher_space"
    input_name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    output_name: str
    output_shape: tuple[int, ...]
    fixed_size: int | None = None

    @property
    def input_scale(self) -> int:
        """Pixels per latent cell along a side of the input: 8 for an image, 1 for a latent."""
        return 1 if self.part == "decoder" else 8

    def metadata(self, vae: VAEBase, source: str,
                 adapter_arch: dict[str, int] | None = None) -> dict[str, str]:
        """The ``metadata_props`` stored in the ONNX file and the TorchScript extra file."""
        image, grid = "height, width", "height/8, width/8"
        if self.fixed_size is not None:
            image, grid = f"{self.fixed_size}, {self.fixed_size}", ""

        def shape(channels: int, is_image: bool) -> str:
            return f"[batch, {channels}" + (f", {image if is_image else grid}]"
                                            if is_image or grid else "]")

        encodes = self.part != "decoder"
        latent_channels = (self.input_shape if self.part == "decoder" else self.output_shape)[0]
        meta = {
            "producer": f"hrm_vision {__version__}",
            "graph": f"{model_name(vae) if self.fixed_size else 'tinyvae'} {self.part}",
            "input": f"{self.input_name} {shape(self.input_shape[0], encodes)} float32",
            "output": f"{self.output_name} {shape(self.output_shape[0], not encodes)} float32",
            "image_range": "[0, 1] (float32; divide uint8 pixels by 255)",
            "color_order": "RGB" if vae.in_channels == 3 else "grey (one channel)",
            "layout": "NCHW",
            "image_size": "any height and width divisible by 8 (dynamic)"
            if self.fixed_size is None else f"{self.fixed_size}x{self.fixed_size} (fixed)",
            "latent_shape": shape(latent_channels, False),
            "latent": "posterior mean (deterministic)",
            "batchnorm": "folded into the convolutions (where there is any)",
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
    """Encoder and decoder specs for square images of side ``image_size``, and the
    teacher-space encoder's when ``teacher_dim`` (the adapter's output channels) is given. A
    compact model's specs are fixed at its crop side (``image_size`` must be that side)."""
    fixed = vae.image_size if isinstance(vae, CompactVAE) else None
    if fixed is not None and image_size != fixed:
        raise ExportError(f"the {model_name(vae)} graphs take {fixed}x{fixed} crops only, "
                          f"not {image_size}x{image_size}")
    latent = vae.latent_shape(image_size, image_size)
    image = (vae.in_channels, image_size, image_size)
    specs = (GraphSpec("encoder", "image", image, "latent", latent, fixed),
             GraphSpec("decoder", "latent", latent, "image", image, fixed))
    if teacher_dim is None:
        return specs
    return (*specs, GraphSpec("encoder_teacher_space", "image", image, "teacher_latent",
                              (teacher_dim, *latent[1:]), fixed))
