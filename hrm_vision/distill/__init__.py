"""Knowledge distillation of the TinyVAE from the teacher VAE."""

from .adapter import LatentAdapter

__all__ = ["LatentAdapter"]
