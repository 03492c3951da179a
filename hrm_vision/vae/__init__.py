"""VAE models: ``TeacherVAE`` and ``MinimalVAE`` (alias ``TinyVAE``) with one shared API.

Images are float tensors in [0, 1], NCHW, RGB, with H and W divisible by 8.

>>> model = MinimalVAE(latent_dim=128, base_channels=32).eval()
>>> z = model.encode(images)          # (B, 128, H/8, W/8), deterministic (posterior mean)
>>> x_hat = model.decode(z)           # (B, 3, H, W) in [0, 1]
>>> out = model(images)               # VAEOutput(reconstruction, mu, logvar, z)
"""

from .adapter import LatentAdapter
from .base import Posterior, VAEBase, VAEOutput
from .compact import CompactStudentVAE, CompactTeacherVAE, CompactVAE
from .models import MinimalVAE, TeacherVAE, TinyVAE
from .registry import MODELS, build_model, count_macs, model_name

__all__ = [
    "MODELS",
    "CompactStudentVAE",
    "CompactTeacherVAE",
    "CompactVAE",
    "LatentAdapter",
    "MinimalVAE",
    "Posterior",
    "TeacherVAE",
    "TinyVAE",
    "VAEBase",
    "VAEOutput",
    "build_model",
    "count_macs",
    "model_name",
]
