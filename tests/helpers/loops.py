"""A :class:`PhaseLoop` for a toy phase, with the messages it emits collected."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from hrm_vision.train.trainer import DistContext, Phase, PhaseLoop


def loop_with_messages(phase: Phase, ctx: DistContext, loader: DataLoader
                       ) -> tuple[PhaseLoop, list[str]]:
    """The loop of ``phase`` training on ``loader``, no stop signal; the list receives every
    ``on_message`` text as it is emitted."""
    messages: list[str] = []

    def emit(hook: str, *args: Any) -> None:
        if hook == "on_message":
            messages.append(args[0])

    loop = PhaseLoop(phase, ctx=ctx, loader=loader, history=[], emit=emit,
                     stop_signal=lambda: None)
    return loop, messages
