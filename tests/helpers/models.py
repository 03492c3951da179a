"""Tiny models for tests: nothing trained, nothing downloaded."""

from __future__ import annotations

import torch

from hrm_vision.vae import MinimalVAE


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every parameter nudged by N(0, 0.05²) (seed 0), so that its
    zero-initialised layers take part in what a test compares too."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def perturbed_student() -> MinimalVAE:
    """A tiny student (latent 8, base width 8), :func:`perturbed`."""
    torch.manual_seed(0)
    return perturbed(MinimalVAE(latent_dim=8, base_channels=8))  # type: ignore[return-value]
