"""The student-to-teacher latent adapter: a 1x1 convolution from the student's latent channels to
the teacher's, trained with the student by distillation and saved with it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentAdapter(nn.Module):
    """A per-location linear map (1x1 convolution) from student to teacher latent channels.

    ``(B, student_dim, h, w) -> (B, teacher_dim, h, w)``, float32, unbounded (latents are not
    range-limited). Both VAEs put their latent on the same H/8 x W/8 grid, so no spatial
    resampling is needed: ``teacher.decode(adapter(student.encode(x)))`` is the teacher's
    decoder reading the student's latent.

    Saved with the student in the distiller's checkpoints (``adapter_state_dict`` and
    ``adapter_arch``); ``hrm_vision.checkpoints.load_model(path, role="adapter")`` rebuilds it.
    """

    def __init__(self, student_dim: int = 128, teacher_dim: int = 512) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments, stored in checkpoints as ``adapter_arch``."""
        return {"student_dim": self.student_dim, "teacher_dim": self.teacher_dim}

    def forward(self, z: Tensor) -> Tensor:
        """Student latent (B, student_dim, h, w) -> teacher latent (B, teacher_dim, h, w)."""
        return self.proj(z)

    @torch.no_grad()
    def init_from_linear_paths(self, student: nn.Module, teacher: nn.Module) -> bool:
        """Start as the student's linear decoder path followed by the teacher's linear encoder
        path (student latent -> 8x8 patch -> teacher latent), when both models have one
        (``linear_path()``). With the nonlinear branches still at zero, this maps a fresh
        student's latent exactly to what the teacher's linear path would encode from the
        student's reconstruction. Returns whether it applied.
        """
        if not (hasattr(student, "linear_path") and hasattr(teacher, "linear_path")):
            return False
        _, _, dec_w, dec_b = student.linear_path()
        enc_w, enc_b, _, _ = teacher.linear_path()
        weight, bias = enc_w @ dec_w, enc_w @ dec_b + enc_b
        if weight.shape != self.proj.weight.shape[:2]:
            return False
        self.proj.weight.copy_(weight[:, :, None, None])
        self.proj.bias.copy_(bias)
        return True

    def variance(self, var: Tensor) -> Tensor:
        """Per-channel variance of ``W z + b`` when ``z ~ N(mu, diag(var))``.

        The diagonal of ``W diag(var) W^T``: ``(B, student_dim, h, w) -> (B, teacher_dim, h, w)``,
        i.e. the marginal variances of the student posterior pushed through the adapter.
        """
        return F.conv2d(var, self.proj.weight.pow(2))
