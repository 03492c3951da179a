"""Checkpoint files: atomic saving, safe loading (``weights_only=True``), rebuilding models.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path)`` under PyTorch's default ``weights_only=True``. Its schema:

- ``format_version`` (int, :data:`FORMAT_VERSION`): written by :func:`save_checkpoint`, checked
  by :func:`load_checkpoint` (a file from a newer layout is a :class:`CheckpointError` naming
  both versions; a file without the key is read as version 1);
- per model role (``"student"``, ``"teacher"``), a model entry (:func:`model_entry`):
  ``f"{role}_state_dict"`` (the ``state_dict()``, no ``module.`` prefixes) and ``f"{role}_arch"``
  (``{"name": <registry name>, **constructor kwargs}``, enough to rebuild it);
- the ``"adapter"`` role (a student checkpoint of the distiller): the
  :class:`~hrm_vision.vae.adapter.LatentAdapter` that maps the student's latent to the
  teacher's latent space, ``adapter_state_dict`` and ``adapter_arch``
  (``{"student_dim": int, "teacher_dim": int}``, no registry name);
- whatever the writer adds; the distiller's training state is written by
  :meth:`hrm_vision.train.trainer.PhaseLoop.payload` (optimizer, scheduler, epoch, config,
  history, RNG). This module only relies on the keys above.

:func:`load_model` rebuilds any role, the adapter included, in eval mode on the CPU.

Every tensor is stored on the CPU (:func:`to_cpu`), so a checkpoint written on a GPU loads on any
machine without ``map_location``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import torch
from torch import nn

from .files import atomic_write
from .vae import MODELS, VAEBase, build_model, model_name
from .weights import (
    CheckpointError,
    check_arch_sizes,
    check_nesting,
    check_state_dict,
    load_state_checked,
    non_finite_tensors,
    widest_stored,
)

if TYPE_CHECKING:
    from .vae.adapter import LatentAdapter

#: Version of the checkpoint layout, stored under ``"format_version"``.
FORMAT_VERSION = 1
#: The role of the student-to-teacher latent adapter (not a VAE: its arch has no registry name).
ADAPTER_ROLE = "adapter"


class ArchConfig(TypedDict, total=False):
    """``{role}_arch``: the registry ``name`` plus the model's constructor keyword arguments."""

    name: str


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor detached and moved to the CPU, through dicts, lists and tuples
    (tuples stay tuples); everything else is returned as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def check_format_version(payload: dict[str, Any], source: str = "checkpoint") -> int:
    """The payload's ``format_version`` (1 when absent); a ``CheckpointError`` when it is newer
    than this package reads or not an integer."""
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{source}: format_version must be a positive integer, "
                              f"got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format_version {version}, newer than the version "
            f"{FORMAT_VERSION} this hrm_vision reads; upgrade hrm_vision to load it")
    return version


def model_entry(model: VAEBase, role: str) -> dict[str, Any]:
    """The two checkpoint keys that describe ``model`` under ``role`` (a model entry):
    ``{role}_state_dict`` (CPU tensors) and ``{role}_arch`` (an :class:`ArchConfig`).

    Unwraps ``DistributedDataParallel``/``torch.compile`` wrappers so keys carry no prefix.
    """
    model = unwrap(model)  # type: ignore[assignment]
    arch: ArchConfig = {"name": model_name(model), **model.arch_config()}  # type: ignore[typeddict-item]
    return {f"{role}_state_dict": to_cpu(model.state_dict()), f"{role}_arch": arch}


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str],
                    require_finite: bool = False) -> Path:
    """Write ``payload`` (tensors moved to the CPU, ``format_version`` added) to ``path``
    atomically (:func:`hrm_vision.files.atomic_write`): a crash at any moment leaves either the
    previous file or the new one, never a half-written one.

    ``require_finite``: refuse (``CheckpointError`` naming the tensors, nothing written) a
    payload with a NaN or infinite floating-point tensor anywhere (weights, optimizer state).
    """
    if require_finite:
        bad = non_finite_tensors(payload)
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise CheckpointError(f"refusing to write {path}: NaN or infinite values in "
                                  f"{', '.join(bad[:5])}{more}; the previous file is kept")
    payload = to_cpu({"format_version": FORMAT_VERSION, **payload})
    return atomic_write(path, lambda f: torch.save(payload, f))


def _torch_reason(exc: Exception) -> str:
    """The first sentence of what went wrong, without torch's weights_only boilerplate (which
    suggests ``weights_only=False``, wrong advice for a corrupt or untrusted file)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the actual reason follows this marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(boilerplate)]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; every failure is a ``CheckpointError``.

    Nothing is unpickled beyond tensors and plain containers: a file holding a pickled object is
    refused with a message saying so. Lists and dicts nested deeper than
    :data:`hrm_vision.weights.MAX_NESTING` levels are refused (:func:`check_nesting`: nothing
    recursing over the payload later hits the recursion limit); the ``format_version`` is
    checked (:func:`check_format_version`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all become one message
        first = _torch_reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "global" in first.lower():
            glob = first
            raise CheckpointError(
                f"{path} holds pickled Python objects, which are refused (only tensors, numbers, "
                f"strings, lists and dicts load safely): {glob}"
            ) from exc
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated file?): {first}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    check_nesting(payload, str(path))
    check_format_version(payload, str(path))
    return payload


def roles_in(payload: dict[str, Any]) -> list[str]:
    """Roles with a stored model in a checkpoint dict (e.g. ``["student", "teacher"]``)."""
    return sorted(k[: -len("_state_dict")] for k in payload
                  if k.endswith("_state_dict") and f"{k[: -len('_state_dict')]}_arch" in payload)


def check_arch(arch: Any, state: Mapping[str, torch.Tensor], source: str
               ) -> tuple[str, dict[str, Any]]:
    """``(registry name, constructor kwargs)`` of a stored ``{role}_arch``, checked before
    anything is allocated: a dict with a registered ``name`` whose other values are numbers or
    strings, each integer within the bound of :func:`check_arch_sizes`."""
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{source}: the architecture must be a dict with a 'name', got "
                              f"{type(arch).__name__}")
    kwargs = dict(arch)
    name = kwargs.pop("name", None)
    if not isinstance(name, str) or name not in MODELS:
        raise CheckpointError(f"{source}: unknown model {name!r}; known: {sorted(MODELS)}")
    wrong = {k: v for k, v in kwargs.items()
             if not isinstance(k, str) or not isinstance(v, (int, float, str, bool))}
    if wrong:
        raise CheckpointError(f"{source}: architecture arguments must be numbers or strings, "
                              f"got {wrong}")
    check_arch_sizes(kwargs, widest_stored(state), source)
    return name, kwargs


def check_adapter_arch(arch: Any, state: Mapping[str, torch.Tensor], source: str
                       ) -> dict[str, int | bool]:
    """The constructor kwargs of a stored ``adapter_arch``, checked before anything is built:
    a dict of positive integer sizes (``student_dim``, ``teacher_dim``) within the bound of
    :func:`check_arch_sizes`, and optionally the flag ``vector`` (a bool: the adapter of vector
    latents)."""
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{source}: adapter_arch {arch!r} must map names to positive "
                              "integer sizes")
    if not isinstance(arch.get("vector", False), bool):
        raise CheckpointError(f"{source}: adapter_arch 'vector' must be true or false, got "
                              f"{arch['vector']!r}")
    sizes = {k: v for k, v in arch.items() if k != "vector"}
    if not sizes or not all(isinstance(k, str) and isinstance(v, int)
                            and not isinstance(v, bool) and v >= 1 for k, v in sizes.items()):
        raise CheckpointError(f"{source}: adapter_arch {arch!r} must map names to positive "
                              "integer sizes")
    check_arch_sizes(sizes, widest_stored(state), source, label="adapter_arch")
    return dict(arch)


def _adapter_class() -> type[LatentAdapter]:
    from .vae.adapter import LatentAdapter  # lazy: torch models stay out of a plain import

    return LatentAdapter


@overload
def model_from_payload(payload: dict[str, Any], role: Literal["adapter"],
                       source: str = ...) -> LatentAdapter: ...
@overload
def model_from_payload(payload: dict[str, Any], role: str = ...,
                       source: str = ...) -> VAEBase: ...
def model_from_payload(payload: dict[str, Any], role: str = "student",
                       source: str = "checkpoint") -> VAEBase | LatentAdapter:
    """Rebuild the ``role`` model from a loaded checkpoint dict (in eval mode, on CPU).

    ``role`` is ``"student"``, ``"teacher"`` (VAEs: images (N, 3, H, W) in [0, 1] <-> latents
    (N, C, H/8, W/8)) or ``"adapter"`` (the
    :class:`~hrm_vision.vae.adapter.LatentAdapter`: student latent (N, student_dim, h, w)
    -> teacher latent space (N, teacher_dim, h, w)). Checked before anything is built
    (:func:`check_arch` or :func:`check_adapter_arch`, :func:`check_state_dict`); the stored
    tensors must then fit the model exactly and be finite. Every problem, a role the checkpoint
    does not hold included (the message lists the roles it has), is a ``CheckpointError``
    naming ``source``.
    """
    if f"{role}_state_dict" not in payload or f"{role}_arch" not in payload:
        raise CheckpointError(
            f"{source} has no {role!r} model (keys {role}_state_dict and {role}_arch); "
            f"it holds: {roles_in(payload) or 'no models'}"
        )
    where = f"{source} ({role})"
    state = check_state_dict(payload[f"{role}_state_dict"], where)
    build: Callable[..., nn.Module]
    if role == ADAPTER_ROLE:
        arch: dict[str, Any] = check_adapter_arch(payload[f"{role}_arch"], state, where)
        build = _adapter_class()
    else:
        name, arch = check_arch(payload[f"{role}_arch"], state, where)
        build = partial(build_model, name)
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights randomly
            model = build(**arch)
    except Exception as exc:  # ValueError from the registry, or what a constructor raises
        raise CheckpointError(f"{source}: cannot rebuild the {role} model: {exc}") from exc
    load_state_checked(model, state, where)
    return model.eval()  # type: ignore[return-value]


def adapter_from_payload(payload: dict[str, Any], source: str = "checkpoint"
                         ) -> LatentAdapter | None:
    """The adapter stored in a checkpoint dict (``adapter_state_dict``/``adapter_arch``), in
    eval mode on the CPU; None when the checkpoint holds none. :func:`model_from_payload` with
    ``role="adapter"`` (the same checks), for a payload already read; from a file,
    ``load_model(path, role="adapter")``."""
    if "adapter_state_dict" not in payload or "adapter_arch" not in payload:
        return None
    return model_from_payload(payload, ADAPTER_ROLE, source)


@overload
def load_model(path: str | os.PathLike[str], role: Literal["adapter"],
               map_location: str | torch.device = ...) -> LatentAdapter: ...
@overload
def load_model(path: str | os.PathLike[str], role: str = ...,
               map_location: str | torch.device = ...) -> VAEBase: ...
def load_model(path: str | os.PathLike[str], role: str = "student",
               map_location: str | torch.device = "cpu") -> VAEBase | LatentAdapter:
    """Load the ``role`` model stored in the checkpoint at ``path``, ready for inference (eval
    mode, on the CPU): ``"student"`` or ``"teacher"`` (a VAE), or ``"adapter"`` (the
    student-to-teacher :class:`~hrm_vision.vae.adapter.LatentAdapter` stored with the
    student in ``tinyvae_best.pth``). See :func:`model_from_payload`.

    ``.pth`` files only: a ``.safetensors`` file (``tinyvae.safetensors`` of the export) loads
    with ``MinimalVAE.from_pretrained`` (:mod:`hrm_vision.pretrained`, which reads it without
    unpickling; its adapter with :func:`hrm_vision.pretrained.load_pretrained_adapter`)."""
    if Path(path).suffix == ".safetensors":
        raise CheckpointError(f"{path} is a .safetensors file: load it with "
                              "MinimalVAE.from_pretrained(path) (the adapter stored beside it: "
                              "hrm_vision.pretrained.load_pretrained_adapter(path))")
    payload = load_checkpoint(path, map_location)
    return model_from_payload(payload, role, source=str(path))
