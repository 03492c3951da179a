"""Optimizer, learning-rate schedule and mixed precision of a training phase.

- :func:`build_optimizer`: AdamW over the phase's parameter groups (``learning_rate``,
  ``weight_decay``).
- :func:`build_scheduler`: linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay
  to 0 at the last step of the phase, stepped once per optimizer step.
- :func:`autocast` / :func:`make_scaler`: ``mixed_precision`` ``auto`` is fp16 with a gradient
  scaler on CUDA and off on CPU; ``bf16``/``fp16``/``off`` force it (bf16 needs no scaler).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .config import DistillConfig


def build_optimizer(param_groups: list[dict[str, Any]], config: DistillConfig) -> AdamW:
    """AdamW over ``param_groups`` with the config's learning rate and weight decay."""
    return AdamW(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` (a last partial window also steps)."""
    return max(1, math.ceil(num_batches / grad_accum_steps))


def build_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                    lr_factor: Callable[[int, int], float] | None = None) -> LRScheduler:
    """Warm-up then cosine decay over ``total_steps`` optimizer steps."""
    total = max(1, total_steps)

    def schedule(group: int) -> Callable[[int], float]:
        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
            progress = min(1.0, step / total)
            extra = lr_factor(group, step) if lr_factor is not None else 1.0
            return warm * 0.5 * (1 + math.cos(math.pi * progress)) * extra
        return factor

    return LambdaLR(optimizer, [schedule(i) for i in range(len(optimizer.param_groups))])


def precision(config: DistillConfig, device: torch.device) -> str:
    """The effective mixed precision: ``off``, ``bf16`` or ``fp16``."""
    mode = config.mixed_precision
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "off"
    return mode


def autocast(config: DistillConfig, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of a forward pass and loss (a no-op context when precision is off)."""
    mode = precision(config, device)
    if mode == "off":
        return nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(config: DistillConfig, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on CUDA."""
    enabled = device.type == "cuda" and precision(config, device) == "fp16"
    return torch.amp.GradScaler("cuda", enabled=enabled)
