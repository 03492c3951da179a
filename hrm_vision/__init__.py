"""hrm-vision: a TinyVAE distilled from a teacher VAE, for IRP perception on edge robots.

Images everywhere in this package are float tensors in [0, 1], NCHW, RGB.
"""

__version__ = "0.1.0"
