"""The adapter as the distiller uses it: :class:`~hrm_vision.vae.adapter.LatentAdapter` (defined
with the models, so a core install loads it) and reading it from a checkpoint dict."""

from __future__ import annotations

from typing import Any

from ..checkpoints import ADAPTER_ROLE, model_from_payload
from ..vae.adapter import LatentAdapter

__all__ = ["LatentAdapter", "adapter_from_payload"]


def adapter_from_payload(payload: dict[str, Any], source: str = "checkpoint"
                         ) -> LatentAdapter | None:
    """The adapter stored in a checkpoint dict (``adapter_state_dict``/``adapter_arch``), in
    eval mode on the CPU; None when the checkpoint holds none.

    :func:`hrm_vision.checkpoints.model_from_payload` with ``role="adapter"`` (the same checks;
    ``load_model(path, role="adapter")`` reads it from a file, and raises instead of returning
    None when there is no adapter).
    """
    if "adapter_state_dict" not in payload or "adapter_arch" not in payload:
        return None
    return model_from_payload(payload, ADAPTER_ROLE, source)
