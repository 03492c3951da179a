"""Optimizer, learning-rate schedule and mixed precision of a training phase.

- :func:`build_optimizer`: AdamW over the phase's parameter groups (``learning_rate``,
  ``weight_decay``).
- :func:`build_scheduler`: ``SequentialLR(LinearLR, CosineAnnealingLR)``, stepped once per
  optimizer step: a linear warm-up over ``warmup_steps`` steps, then a cosine decay to 0 at the
  last step of the phase.
- :func:`autocast` / :func:`make_scaler`: ``mixed_precision`` ``auto`` is fp16 with a gradient
  scaler on CUDA and off on CPU; ``bf16``/``fp16``/``off`` force it (bf16 needs no scaler).

An exponential moving average of the weights a phase trains (Polyak averaging).

With a fixed learning rate, Adam's steps keep the weights jittering around a good point; the
average sits near that point. For these VAEs the jitter is what limits reconstruction most in
short runs: ``python experiments/model_ablation.py --model tinyvae --lr 3e-4 --ema 0.99``
against ``--ema 0`` measures it (``docs/models.md``).

:class:`WeightAverage` wraps ``torch.optim.swa_utils.AveragedModel`` (EMA of parameters and
buffers). Validation, the best checkpoint and every saved model use the averaged weights
(:meth:`WeightAverage.applied`); training continues from the raw weights, which a checkpoint
also carries (``train_state_dict``) so a resumed run is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import DistillConfig


def build_optimizer(param_groups: list[dict[str, Any]], config: DistillConfig) -> AdamW:
    """AdamW over ``param_groups`` with the config's learning rate and weight decay."""
    return AdamW(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` (a last partial window also steps)."""
    return max(1, math.ceil(num_batches / grad_accum_steps))


def build_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Linear warm-up, then cosine decay to 0, over ``total_steps`` optimizer steps.

    With base rate ``lr`` and ``W = warmup_steps``, the rate of optimizer step ``k`` (0-based,
    the rate used by the ``k``-th ``optimizer.step()``) is ``lr * (k + 1) / W`` for ``k < W``,
    then ``lr * (1 + cos(pi * (k - W) / (total_steps - W))) / 2``: ``lr`` at ``k = W`` and 0 at
    ``k = total_steps``. ``W <= 1`` means no warm-up; a phase shorter than ``W`` steps ends
    inside the warm-up (the warm-up is never shortened).
    """
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps <= 1:
        return decay
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                      total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


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


class WeightAverage:
    """EMA of ``module``'s parameters and buffers with ``decay`` in (0, 1).

    ``update()`` after each optimizer step; ``with average.applied(): ...`` runs code with the
    averaged weights loaded into ``module`` and puts the raw weights back afterwards.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module, self.decay = module, decay
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights into the average."""
        self.averaged.update_parameters(self.module)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Load the averaged weights into ``module`` for the duration of the block."""
        raw = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.averaged.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(raw)

    def train_payload(self) -> dict[str, Any]:
        """What a resumable checkpoint needs besides the averaged model: the raw weights and
        how many updates the average has seen (CPU tensors)."""
        return {"train_state_dict": {k: v.detach().cpu().clone()
                                     for k, v in self.module.state_dict().items()},
                "ema_updates": int(self.averaged.n_averaged.item())}

    @torch.no_grad()
    def restore(self, payload: dict[str, Any]) -> None:
        """After the averaged weights were loaded into ``module`` from a checkpoint: make them
        the average again and put the raw training weights (``train_state_dict``) back."""
        self.averaged.module.load_state_dict(self.module.state_dict())
        self.averaged.n_averaged.fill_(int(payload.get("ema_updates", 1)))
        if "train_state_dict" in payload:
            self.module.load_state_dict(payload["train_state_dict"])
