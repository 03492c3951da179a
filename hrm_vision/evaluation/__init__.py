"""Teacher-versus-student evidence: footprint, speed, quality and latent alignment.

The command is ``python -m hrm_vision.evaluation`` (:mod:`hrm_vision.evaluation.__main__`);
:mod:`.run` combines the measurements, each computed the same way for both models:
:mod:`.footprint` (parameters, file sizes, MACs), :mod:`.speed` (latency and throughput, through
:mod:`.timing`), :mod:`.quality` (PSNR, SSIM, CKA, uint8 latent), :mod:`.report` (Markdown, PNG).
"""

from ..timing import interleaved_timings, machine_info, summarize_timings, timed
from .footprint import footprint, weight_file_bytes
from .quality import (
    QualityResult,
    dequantize_uint8,
    measure_quality,
    quantize_uint8,
)

__all__ = [
    "QualityResult",
    "dequantize_uint8",
    "footprint",
    "interleaved_timings",
    "machine_info",
    "measure_quality",
    "quantize_uint8",
    "summarize_timings",
    "timed",
    "weight_file_bytes",
]
