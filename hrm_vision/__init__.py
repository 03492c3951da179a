"""hrm-vision: a TinyVAE distilled from a teacher VAE, for IRP perception on edge robots.

Images everywhere in this package are float tensors in [0, 1], NCHW, RGB.

Importing ``hrm_vision`` (or :mod:`hrm_vision.vae`, :mod:`hrm_vision.checkpoints`,
:mod:`hrm_vision.irp`) needs only the core dependencies; training, the ``photos`` dataset and
export need extras (``pip install 'hrm-vision[all]'``), imported where they are used.
"""

__version__ = "0.1.0"

# Installs the weights reader and writer behind MinimalVAE.from_pretrained / save_pretrained
# (hrm_vision.vae.base.WEIGHTS_FILES): the models themselves hold no file code.
from . import pretrained as _pretrained  # noqa: E402, F401
