"""The model behind the SAGE drop-in: :func:`build_model`, the one place it is chosen, and
:class:`TinyVAE`, SAGE's model-level signature over it.

SAGE's code that uses the model directly expects ``mu, logvar = vae.encode(x)`` and
``recon, mu, logvar = vae(x)``; hrm-vision's models return ``mu`` from ``encode`` and a typed
output from ``forward``, so :class:`TinyVAE` adapts them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..compact import CompactStudentVAE
from ..io import load


def build_model(latent_dim: int, input_channels: int, img_size: int) -> nn.Module:
    """The untrained model for SAGE's size kwargs: the compact student
    (:class:`~hrm_vision.vae.CompactStudentVAE`), a vector latent ``(latent_dim,)`` for an
    ``img_size`` crop (64), its linear path the whole-crop DCT until it is trained; RGB input:
    grey crops are repeated to 3 channels by the callers.

    Raises:
        ValueError: sizes the compact student cannot take (its message names them).
    """
    del input_channels  # grey crops reach the model as RGB
    return CompactStudentVAE(latent_dim=latent_dim, image_size=img_size)


class TinyVAE(nn.Module):
    """SAGE's ``TinyVAE(input_channels, latent_dim, img_size)`` over hrm-vision's model.

    Images are ``(B, input_channels, img_size, img_size)`` float in [0, 1], RGB (or grey with
    ``input_channels=1``: repeated to RGB for an RGB model and averaged back on decoding, as they
    are for a grey checkpoint's model).
    ``forward`` samples ``z`` in training mode and decodes ``mu`` in eval mode (SAGE's model
    samples in both).

    Args:
        checkpoint: weights to load (``tinyvae_best.pth`` or ``.safetensors``); its latent size
            must equal ``latent_dim``. ``None``: the untrained model of :func:`build_model`.
    """

    def __init__(self, input_channels: int = 3, latent_dim: int = 64, img_size: int = 64,
                 checkpoint: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if input_channels not in (1, 3):
            raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")
        if checkpoint is None:
            model = build_model(latent_dim, input_channels, img_size)
        else:
            model = load(checkpoint, role="student")
            if model.latent_dim != latent_dim:
                raise ValueError(f"latent_dim={latent_dim} disagrees with the checkpoint "
                                 f"{checkpoint}, whose model has latent_dim {model.latent_dim}")
            if input_channels == 3 and model.in_channels == 1:
                raise ValueError(f"input_channels=3 disagrees with the checkpoint {checkpoint}, "
                                 "whose model takes 1-channel crops; pass input_channels=1")
        self.model = model
        self.input_channels, self.latent_dim, self.img_size = input_channels, latent_dim, img_size

    def _rgb(self, x: Tensor) -> Tensor:
        """Grey crops repeated to RGB for an RGB model (a grey model takes them as they are)."""
        if self.model.in_channels == 3 and self.input_channels == 1 and x.dim() == 4 \
                and x.shape[1] == 1:
            return x.expand(-1, 3, -1, -1)
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``(B, *latent_shape)``."""
        mu, logvar = self.model.posterior(self._rgb(x))
        return mu, logvar

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, input_channels, img_size, img_size)`` in [0, 1]."""
        images = self.model.decode(z)
        return images.mean(1, keepdim=True) if images.shape[1] != self.input_channels else images

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, mu, logvar)``."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar
