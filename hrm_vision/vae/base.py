"""The API shared by both VAEs: input checks, posterior, encode/decode, typed forward output."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from .blocks import clamp01


class Posterior(NamedTuple):
    """Diagonal Gaussian posterior ``q(z|x)``; both tensors are ``(B, latent_dim, H/8, W/8)``."""

    mu: Tensor
    logvar: Tensor


class VAEOutput(NamedTuple):
    """What ``forward`` returns.

    reconstruction: ``(B, 3, H, W)`` in [0, 1].
    mu, logvar: posterior parameters, ``(B, latent_dim, H/8, W/8)``.
    z: the latent that was decoded: a sample in training mode (or when ``sample=True``), else mu.
    """

    reconstruction: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


_V = TypeVar("_V", bound="VAEBase")

#: How many times smaller the latent grid is than the image, in each direction (both VAEs).
DOWNSAMPLE_FACTOR = 8


def image_size_fits(height: int, width: int) -> bool:
    """The one statement of the size rule: an image of ``height`` x ``width`` pixels fits the
    models when both sides are positive multiples of :data:`DOWNSAMPLE_FACTOR` (8). Callers
    (the models' input check, the training config) phrase their own error around it."""
    return (height > 0 and width > 0 and height % DOWNSAMPLE_FACTOR == 0
            and width % DOWNSAMPLE_FACTOR == 0)


#: The file reader (``"load"``) and writer (``"save"``) behind :meth:`VAEBase.from_pretrained`
#: and :meth:`VAEBase.save_pretrained`: :func:`hrm_vision.pretrained.load_pretrained` and
#: :func:`hrm_vision.pretrained.save_pretrained`, put here when :mod:`hrm_vision.pretrained` is
#: imported, which ``import hrm_vision`` (run by every import of ``hrm_vision.vae``) does. The
#: models hold no file code and import nothing above them.
WEIGHTS_FILES: dict[str, Callable[..., Any]] = {}


class VAEBase(nn.Module):
    """A convolutional VAE with a spatial latent on a grid ``downsample_factor`` times smaller.

    Subclasses build ``self.encoder`` (image -> ``2 * latent_dim`` channels: mu then logvar) and
    ``self.decoder`` (latent -> logits of the image) and record their constructor arguments in
    ``self._arch`` so a checkpoint can rebuild them (see :meth:`arch_config`).

    Contract: images are float tensors in [0, 1], NCHW, RGB, with H and W divisible by 8.
    """

    in_channels: int = 3
    downsample_factor: int = DOWNSAMPLE_FACTOR
    #: logvar is clamped to this range so exp() stays finite in fp16/bf16.
    logvar_range: tuple[float, float] = (-30.0, 20.0)

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim
        self._arch: dict[str, Any] = {}

    # ------------------------------------------------------------------ description
    def arch_config(self) -> dict[str, Any]:
        """Constructor keyword arguments: ``type(self)(**model.arch_config())`` rebuilds it."""
        return dict(self._arch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_shape(self, height: int = 32, width: int = 32) -> tuple[int, int, int]:
        """``(latent_dim, H/8, W/8)`` for an image of the given size."""
        f = self.downsample_factor
        return (self.latent_dim, height // f, width // f)

    # ------------------------------------------------------------------ saved weights
    @classmethod
    def from_pretrained(cls: type[_V], path: str | os.PathLike[str], role: str | None = None,
                        device: str | torch.device | None = None) -> _V:
        """The model saved at ``path`` (``.safetensors`` or a ``.pth`` checkpoint), in eval mode
        on the CPU unless ``device`` is given; a file holding another class is an error.

        See :func:`hrm_vision.pretrained.load_pretrained` (with ``expected=cls``).
        """
        return WEIGHTS_FILES["load"](path, role=role, device=device, expected=cls)

    def save_pretrained(self, path: str | os.PathLike[str], role: str | None = None) -> Path:
        """Write the weights and architecture to a ``.safetensors`` file.

        See :func:`hrm_vision.pretrained.save_pretrained`.
        """
        return WEIGHTS_FILES["save"](self, path, role=role)

    # ------------------------------------------------------------------ checks
    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) (NCHW), got a tensor of rank {x.dim()} "
                f"with shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"expected float images in [0, 1], got dtype {x.dtype}; "
                "convert uint8 frames with x.float() / 255"
            )
        if x.shape[1] != self.in_channels:
            kind = "1 grey channel" if self.in_channels == 1 else f"{self.in_channels} RGB channels"
            raise ValueError(
                f"expected {kind} in dimension 1 (NCHW), got shape "
                f"{tuple(x.shape)}; channels-last input needs x.permute(0, 3, 1, 2)"
            )
        f = self.downsample_factor
        if not image_size_fits(x.shape[2], x.shape[3]):
            raise ValueError(
                f"image height and width must be divisible by {f}, got {x.shape[2]}x{x.shape[3]}; "
                "resize or crop the input"
            )

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"expected a latent of shape (B, {self.latent_dim}, H/8, W/8), got {shape}"
            )
        if not z.is_floating_point():
            raise ValueError(f"expected a float latent, got dtype {z.dtype}")

    # ------------------------------------------------------------------ initialisation
    def init_from_data(self, images: Tensor) -> None:
        """Initialise data-dependent parameters from training images before training starts.

        ``images``: ``(N, 3, H, W)`` float in [0, 1], a few thousand training images. A trainer
        calls this once on a freshly built model (never on a resumed or loaded one). The base
        class has nothing to fit; subclasses override it.
        """
        self._check_images(images)

    # ------------------------------------------------------------------ API
    def posterior(self, x: Tensor) -> Posterior:
        """Posterior parameters of images ``x`` (B, 3, H, W) in [0, 1]."""
        self._check_images(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return Posterior(mu, logvar.clamp(*self.logvar_range))

    def encode(self, x: Tensor) -> Tensor:
        """Deterministic latent (the posterior mean), ``(B, latent_dim, H/8, W/8)``.

        This is what :meth:`decode` takes; it never samples.
        """
        return self.posterior(x).mu

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, 3, 8h, 8w)`` in [0, 1] from latents ``(B, latent_dim, h, w)``."""
        self._check_latent(z)
        return self._output(self.decoder(z))

    def _output(self, raw: Tensor) -> Tensor:
        """Decoder output to an image in [0, 1]: clamped, straight-through while training."""
        return clamp01(raw, straight_through=self.training and torch.is_grad_enabled())

    @torch.no_grad()
    def decode_sample(self, x: Tensor, seed: int = 0) -> Tensor:
        """``decode(z)`` with ``z`` one posterior sample per image of ``x`` (B, C, H, W) in
        [0, 1], drawn from a generator seeded with ``seed`` (the global random streams are left
        alone): the reconstruction the model's rate buys, same shape as ``x``, in [0, 1]."""
        mu, logvar = self.posterior(x)
        gen = torch.Generator(device=mu.device).manual_seed(seed)
        noise = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + torch.exp(0.5 * logvar) * noise)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """A sample ``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor, sample: bool | None = None) -> VAEOutput:
        """Encode, (optionally) sample, decode.

        ``sample`` defaults to ``self.training``: training samples z, eval mode decodes mu.
        """
        mu, logvar = self.posterior(x)
        do_sample = self.training if sample is None else sample
        z = self.reparameterize(mu, logvar) if do_sample else mu
        return VAEOutput(self.decode(z), mu, logvar, z)
