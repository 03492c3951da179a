"""The student-to-teacher latent adapter: a linear map from the student's latent to the teacher's
(a 1x1 convolution for latents on a grid, a fully connected layer for vector latents), trained
with the student by distillation and saved with it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentAdapter(nn.Module):
    """A linear map from student to teacher latent channels.

    Spatial latents (``vector=False``): a per-location 1x1 convolution,
    ``(B, student_dim, h, w) -> (B, teacher_dim, h, w)``; both VAEs put their latent on the same
    H/8 x W/8 grid, so no spatial resampling is needed. Vector latents (``vector=True``, the
    compact models): a fully connected layer, ``(B, student_dim) -> (B, teacher_dim)``. Float32,
    unbounded (latents are not range-limited). Either way
    ``teacher.decode(adapter(student.encode(x)))`` is the teacher's decoder reading the
    student's latent.

    Saved with the student in the distiller's checkpoints (``adapter_state_dict`` and
    ``adapter_arch``); ``hrm_vision.checkpoints.load_model(path, role="adapter")`` rebuilds it.
    """

    def __init__(self, student_dim: int = 128, teacher_dim: int = 512,
                 vector: bool = False) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim, self.vector = student_dim, teacher_dim, vector
        self.proj: nn.Linear | nn.Conv2d = (nn.Linear(student_dim, teacher_dim) if vector
                                            else nn.Conv2d(student_dim, teacher_dim, 1))

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments, stored in checkpoints as ``adapter_arch`` (``vector`` only when
        set, so a spatial adapter's entry reads as it always has)."""
        arch: dict[str, Any] = {"student_dim": self.student_dim, "teacher_dim": self.teacher_dim}
        return {**arch, "vector": True} if self.vector else arch

    def forward(self, z: Tensor) -> Tensor:
        """Student latent (B, student_dim[, h, w]) -> teacher latent (B, teacher_dim[, h, w])."""
        return self.proj(z)

    def _weight(self) -> Tensor:
        """The map's matrix ``(teacher_dim, student_dim)``."""
        return self.proj.weight.reshape(self.teacher_dim, self.student_dim)

    @torch.no_grad()
    def init_from_linear_paths(self, student: nn.Module, teacher: nn.Module) -> bool:
        """Start as the student's linear decoder path followed by the teacher's linear encoder
        path (student latent -> image patch or crop -> teacher latent), when both models have
        one (``linear_path()``). With the nonlinear branches still at zero, this maps a fresh
        student's latent exactly to what the teacher's linear path would encode from the
        student's reconstruction. Returns whether it applied.
        """
        if not (hasattr(student, "linear_path") and hasattr(teacher, "linear_path")):
            return False
        _, _, dec_w, dec_b = student.linear_path()
        enc_w, enc_b, _, _ = teacher.linear_path()
        if enc_w.shape[1] != dec_w.shape[0]:
            return False
        weight, bias = enc_w @ dec_w, enc_w @ dec_b + enc_b
        if weight.shape != self._weight().shape:
            return False
        self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
        self.proj.bias.copy_(bias)
        return True

    def variance(self, var: Tensor) -> Tensor:
        """Per-channel variance of ``W z + b`` when ``z ~ N(mu, diag(var))``.

        The diagonal of ``W diag(var) W^T``, same layout as :meth:`forward`: the marginal
        variances of the student posterior pushed through the adapter.
        """
        w2 = self._weight().pow(2)
        if self.vector:
            return var @ w2.T
        return F.conv2d(var, w2[:, :, None, None])
