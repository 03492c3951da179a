"""The student-to-teacher latent adapter (trained with the student, saved in every checkpoint)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import CheckpointError, check_state_dict, load_state_checked


class LatentAdapter(nn.Module):
    """A per-location linear map (1x1 convolution) from student to teacher latent channels.

    ``(B, student_dim, h, w) -> (B, teacher_dim, h, w)``. Both VAEs put their latent on the same
    H/8 x W/8 grid, so no spatial resampling is needed.
    """

    def __init__(self, student_dim: int = 128, teacher_dim: int = 512) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments, stored in checkpoints as ``adapter_arch``."""
        return {"student_dim": self.student_dim, "teacher_dim": self.teacher_dim}

    def forward(self, z: Tensor) -> Tensor:
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


def adapter_from_payload(payload: dict[str, Any], source: str = "checkpoint"
                         ) -> LatentAdapter | None:
    """The adapter stored in a checkpoint dict (``adapter_state_dict``/``adapter_arch``), in
    eval mode on the CPU; None when the checkpoint holds none."""
    if "adapter_state_dict" not in payload or "adapter_arch" not in payload:
        return None
    arch, state = payload["adapter_arch"], check_state_dict(payload["adapter_state_dict"], source)
    widest = max((max(t.shape, default=0) for t in state.values()), default=0)
    sizes = arch.values() if isinstance(arch, dict) else [None]
    if not all(isinstance(v, int) and 1 <= v <= widest for v in sizes):
        raise CheckpointError(f"{source}: adapter_arch {arch!r} must hold channel counts between "
                              f"1 and {widest} (the widest stored tensor)")
    try:
        adapter = LatentAdapter(**arch)
    except TypeError as exc:
        raise CheckpointError(f"{source}: cannot rebuild the adapter: {exc}") from exc
    load_state_checked(adapter, payload["adapter_state_dict"], f"{source} (adapter)")
    return adapter.eval()
