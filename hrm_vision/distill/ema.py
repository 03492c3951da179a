"""An exponential moving average of the weights a phase trains (Polyak averaging).

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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


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
