"""hrm-vision: a TinyVAE distilled from a teacher VAE, for IRP perception on edge robots.

Images are float tensors in [0, 1], NCHW, RGB. ``import hrm_vision`` needs only the core
dependencies; training, the ``photos`` dataset and export need extras (``pip install
'hrm-vision[all]'``), imported where they are used.

>>> model = hrm_vision.load("checkpoints/tinyvae_best.pth")       # doctest: +SKIP
>>> hrm_vision.save(model, "tinyvae.safetensors")                # doctest: +SKIP
"""

from ._version import __version__
from .compact import CompactStudentVAE, CompactTeacherVAE  # importing it registers the pair
from .io import load, save
from .vae import LatentAdapter, MinimalVAE, TeacherVAE

__all__ = ["CompactStudentVAE", "CompactTeacherVAE", "LatentAdapter", "MinimalVAE",
           "TeacherVAE", "__version__", "load", "save"]
