"""hrm-vision: a TinyVAE distilled from a teacher VAE, for IRP perception on edge robots.

Images are float tensors in [0, 1], NCHW, RGB. ``import hrm_vision`` needs only the core
dependencies; training, the ``photos`` dataset and export need extras (``pip install
'hrm-vision[all]'``), imported where they are used.

>>> model = hrm_vision.load("checkpoints/tinyvae_best.pth")       # doctest: +SKIP
>>> hrm_vision.save(model, "tinyvae.safetensors")                # doctest: +SKIP
"""

__version__ = "0.1.0"

from .compact import CompactStudentVAE, CompactTeacherVAE  # noqa: E402 (registers the pair)
from .io import load, save  # noqa: E402
from .vae import LatentAdapter, MinimalVAE, TeacherVAE  # noqa: E402

__all__ = ["CompactStudentVAE", "CompactTeacherVAE", "LatentAdapter", "MinimalVAE",
           "TeacherVAE", "__version__", "load", "save"]
