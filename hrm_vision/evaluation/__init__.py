"""Teacher-versus-student evidence: footprint, speed, quality and latent alignment.

The command is ``python -m hrm_vision.evaluate`` (see :mod:`hrm_vision.evaluate`); this package
holds the measurements it combines, each computed the same way for both models.
"""

from .footprint import footprint, weight_file_bytes
from .quality import QualityResult, dequantize_uint8, measure_quality, quantize_uint8
from .timing import interleaved_timings, summarize_timings

__all__ = [
    "QualityResult",
    "dequantize_uint8",
    "footprint",
    "interleaved_timings",
    "measure_quality",
    "quantize_uint8",
    "summarize_timings",
    "weight_file_bytes",
]
