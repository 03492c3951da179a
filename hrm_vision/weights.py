"""Checks on stored weights before and while they load into a model: a mapping of names to
tensors, the model's keys, shapes and dtypes (floating weights take any float dtype, cast; an
integer or bool tensor is never a weight), finite values, and architecture sizes no larger than
the stored tensors allow. Every failure is a :class:`CheckpointError` naming the source.

Used by :mod:`hrm_vision.checkpoints` (``.pth``), :mod:`hrm_vision.pretrained`
(``.safetensors``) and the trainer's resume. :func:`check_nesting` bounds how deep the lists and
dicts of a loaded file nest, so that nothing recursing over them later (a check, ``repr``, a JSON
write) hits Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A file that is missing, unreadable, not a checkpoint, or does not fit the model."""


#: Deepest nesting of lists, tuples and dicts a loaded file may hold; this package's files nest
#: at most 4 levels (a history record's values), far below Python's recursion limit.
MAX_NESTING = 32


def check_nesting(value: Any, source: str, limit: int = MAX_NESTING) -> None:
    """A ``CheckpointError`` ("``source`` is nested too deep") when the lists, tuples and dicts
    of ``value`` nest more than ``limit`` levels. Walks without recursion, so a file crafted to
    nest 100,000 levels is refused before anything recurses over it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            raise CheckpointError(f"{source} is nested too deep: more than {limit} levels of "
                                  "lists and dicts (a crafted or corrupt file?)")
        stack.extend((child, depth + 1) for child in children)


def non_finite_tensors(value: Any, prefix: str = "") -> list[str]:
    """The keys (``a.b.c`` paths through dicts and lists) of every floating-point tensor in
    ``value`` that holds a NaN or an infinity."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return [prefix or "<tensor>"]
        return []
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [bad for k, v in items for bad in non_finite_tensors(v, f"{prefix}.{k}" if prefix
                                                                 else str(k))]


def check_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """``state`` as a dict of tensors; a ``CheckpointError`` naming ``source`` when it is not a
    mapping of names to tensors."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: the state dict must map names to tensors, got "
                              f"{type(state).__name__}")
    wrong = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
             if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise CheckpointError(f"{source}: the state dict must map names to tensors; not a "
                              f"tensor: {', '.join(wrong[:5])}"
                              + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    return dict(state)


def check_finite(state: Mapping[str, Any], source: str) -> None:
    """A ``CheckpointError`` naming the tensors of ``state`` that hold NaN or infinity."""
    bad = non_finite_tensors(dict(state))
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite weights in {', '.join(bad[:5])}"
                              + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))


def load_state_checked(module: nn.Module, state: Any, source: str) -> None:
    """``module.load_state_dict(state)`` with a message naming missing keys, shape mismatches,
    entries that are not tensors and non-finite weights (:func:`check_fits`)."""
    module.load_state_dict(check_fits(module, state, source))


def check_fits(module: nn.Module, state: Any, source: str) -> dict[str, torch.Tensor]:
    """``state`` checked to load into ``module``: a dict of finite tensors with exactly the
    module's keys and shapes; a ``CheckpointError`` names what does not fit."""
    state = check_state_dict(state, source)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    mistyped = [f"{k}: checkpoint {state[k].dtype} vs model {v.dtype}"
                for k, v in own.items() if k in state and not dtype_fits(state[k].dtype, v.dtype)]
    if missing or unexpected or mismatched or mistyped:
        parts = []
        if mistyped:
            parts.append("wrong dtypes (floating weights must be stored as floats, integer "
                         "buffers as the same integers): " + "; ".join(mistyped[:5])
                         + (f" (+{len(mistyped) - 5} more)" if len(mistyped) > 5 else ""))
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(mismatched[:5])
                         + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""))
        if missing:
            parts.append(f"missing keys: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:5]}"
                         + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: "
                              + " | ".join(parts))
    check_finite(state, source)
    return {k: v.to(own[k].dtype) for k, v in state.items()}


def dtype_fits(stored: torch.dtype, model: torch.dtype) -> bool:
    """Whether a stored tensor of dtype ``stored`` may load into a model tensor of ``model``:
    a floating model tensor takes any floating dtype (cast: fp16 and bf16 checkpoints load), any
    other takes exactly its own dtype (an int64 or bool tensor is never a weight)."""
    if model.is_floating_point:
        return stored.is_floating_point
    return stored == model


#: Largest integer architecture argument (channels, blocks, latent size) a stored file may ask
#: for; far above any model of this package (512 channels, 4 blocks).
MAX_ARCH_INT = 1 << 16


def widest_stored(state: Mapping[str, torch.Tensor]) -> int:
    """The largest dimension of the tensors of ``state`` that hold values (an empty tensor, of
    shape ``(0, 200000)`` say, stores nothing and lifts nothing)."""
    return max((d for t in state.values() if t.numel() for d in t.shape), default=0)


def check_arch_sizes(kwargs: Mapping[str, Any], widest: int, source: str,
                       label: str = "architecture") -> None:
    """Refuse, before anything is built, integer architecture arguments (channels, blocks,
    latent sizes) outside ``[0, min(widest, MAX_ARCH_INT)]``: no size of these models exceeds
    the widest stored tensor that holds values, so a crafted file cannot ask for an absurd
    allocation."""
    limit = min(widest, MAX_ARCH_INT)
    for key, value in kwargs.items():
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            raise CheckpointError(f"{source}: {label} {key}={value} is outside [0, {limit}], "
                                  "the widest stored tensor that holds values")
