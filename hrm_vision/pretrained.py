"""Weights for deployment: ``save_pretrained`` writes ``.safetensors``, ``load_pretrained`` reads it
or a ``.pth`` checkpoint of this package.

>>> save_pretrained(model, "tinyvae.safetensors")            # doctest: +SKIP
>>> model = MinimalVAE.from_pretrained("tinyvae.safetensors")   # doctest: +SKIP
>>> model = MinimalVAE.from_pretrained("checkpoints/tinyvae_best.pth")   # doctest: +SKIP

A ``.safetensors`` file holds only tensors (nothing is unpickled on load) and string metadata:

- ``arch``: JSON ``{"name": <registry name>, **constructor kwargs}``, enough to rebuild the model;
- ``role``: ``"student"`` or ``"teacher"``;
- ``images``: the input convention, ``float RGB in [0, 1], NCHW``, H and W divisible by 8;
- ``format_version`` and ``library`` (``hrm-vision <version>``);
- ``adapter_arch`` (only with an adapter): JSON of the student-to-teacher
  :class:`~hrm_vision.vae.adapter.LatentAdapter`'s constructor kwargs, its tensors stored under
  ``adapter.`` (:func:`load_pretrained_adapter` reads them; a VAE load skips them).

Loading checks that the architecture is a registered model whose integer arguments do not exceed
the widest stored tensor (so a crafted file cannot ask for absurd sizes), that the model's
parameter and buffer shapes are exactly the stored ones (before a ``.safetensors`` file's tensor
data is read), and that every floating-point tensor is finite. Every problem with the file is a
:class:`hrm_vision.checkpoints.CheckpointError` naming the file. Models load on the CPU unless
``device`` is given, whatever device they were trained on.

This module sits above the models and :mod:`hrm_vision.checkpoints`: the models hold no file
code. ``MinimalVAE.from_pretrained`` and ``model.save_pretrained`` are :func:`load_pretrained`
(with ``expected`` the class) and :func:`save_pretrained`, installed into
:data:`hrm_vision.vae.base.WEIGHTS_FILES` when ``hrm_vision`` is imported (every import of
``hrm_vision.vae`` imports the package first). ``safetensors`` is imported when a function here
runs.

The one way to load each file: a ``.safetensors`` file with ``MinimalVAE.from_pretrained`` (the
adapter stored beside it with :func:`load_pretrained_adapter`), a ``.pth`` checkpoint with
:func:`hrm_vision.checkpoints.load_model`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from . import __version__
from .checkpoints import (
    ADAPTER_ROLE,
    CheckpointError,
    load_checkpoint,
    model_from_payload,
    roles_in,
    unwrap,
)
from .files import atomic_write
from .vae import MODELS, VAEBase, build_model, model_name
from .vae.base import WEIGHTS_FILES
from .weights import check_arch_sizes, check_nesting, load_state_checked

#: Version of the metadata layout written by :func:`save_pretrained`.
FORMAT_VERSION = 1
#: File suffix of the safetensors format; any other suffix is read as a torch checkpoint.
SAFETENSORS_SUFFIX = ".safetensors"
#: The image convention stored in every file (and in every docstring of the package).
IMAGE_CONVENTION = "float RGB in [0, 1], NCHW, H and W divisible by 8"
#: Name prefix of the adapter's tensors in a ``.safetensors`` file that also holds one.
ADAPTER_PREFIX = "adapter."
#: Most characters the string metadata of a ``.safetensors`` file may hold, keys and values
#: together (what :func:`save_pretrained` writes is a few hundred).
MAX_METADATA_CHARS = 1 << 16
#: Role written when none is given, by registry name.
DEFAULT_ROLES: dict[str, str] = {"tinyvae": "student", "teacher": "teacher",
                                 "compact_student": "student", "compact_teacher": "teacher"}

M = TypeVar("M", bound=VAEBase)


def _error(message: str) -> Exception:
    return CheckpointError(message)


def save_pretrained(model: VAEBase, path: str | os.PathLike[str],
                    role: str | None = None, adapter: torch.nn.Module | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (a ``.safetensors`` file) with its architecture.

    Args:
        model: a ``MinimalVAE`` or ``TeacherVAE`` (DDP / ``torch.compile`` wrappers are unwrapped).
        path: the file to write, ending in ``.safetensors``; written atomically (temporary file,
            fsync, rename), parent folders created.
        role: stored as metadata (default: ``"student"`` for a TinyVAE, ``"teacher"`` for a
            teacher).

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``, or a weight is NaN or infinite.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"save_pretrained writes {SAFETENSORS_SUFFIX} files, got {path}")
    model = unwrap(model)  # type: ignore[assignment]
    name = model_name(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if adapter is not None:
        tensors.update({ADAPTER_PREFIX + k: v.detach().to("cpu").contiguous()
                        for k, v in unwrap(adapter).state_dict().items()})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights ({', '.join(bad[:5])}) to {path}")
    metadata = {
        "format": "pt",
        "arch": json.dumps({"name": name, **model.arch_config()}, sort_keys=True),
        "role": role or DEFAULT_ROLES.get(name, name),
        "images": IMAGE_CONVENTION,
        "format_version": str(FORMAT_VERSION),
        "library": f"hrm-vision {_version()}",
    }
    if adapter is not None:
        metadata["adapter_arch"] = json.dumps(unwrap(adapter).arch_config(), sort_keys=True)
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``arch``, ``role``, ``images``, ...),
    at most :data:`MAX_METADATA_CHARS` characters."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _error(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, UnicodeDecodeError, ...
        raise _error(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                     f"{_first_line(exc)}") from exc
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if size > MAX_METADATA_CHARS:
        raise _error(f"metadata of {path} is too large: {size} characters, at most "
                     f"{MAX_METADATA_CHARS} (a crafted file?)")
    return metadata


def _metadata_json(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    """The JSON value of metadata ``key`` (an architecture: a flat dict), nested at most a few
    levels; a named ``CheckpointError`` for invalid or too deeply nested JSON."""
    where = f"the {key!r} metadata of {path}"
    try:
        value = json.loads(metadata[key])
    except RecursionError:
        raise _error(f"{where} is nested too deep (a crafted file?)") from None
    except ValueError as exc:  # JSONDecodeError, a 5000-digit number
        raise _error(f"{where} is not valid JSON ({_first_line(exc)})") from exc
    check_nesting(value, where, limit=2)
    return value


def load_pretrained(path: str | os.PathLike[str], role: str | None = None,
                    device: str | torch.device | None = None,
                    expected: type[M] = VAEBase) -> M:  # type: ignore[assignment]
    """The model stored at ``path``, in eval mode, on the CPU (or ``device``).

    Args:
        path: a ``.safetensors`` file from :func:`save_pretrained`, or a ``.pth`` checkpoint of
            this package (``tinyvae_best.pth``, ``teacher.pth``, ...; read with
            ``torch.load(weights_only=True)``).
        role: which model to take, ``"student"`` or ``"teacher"``. Default: for a ``.pth``, the
            model of class ``expected`` (the student when several fit); for a ``.safetensors``
            file, the one it holds. Given for a ``.safetensors`` file, it must match the stored
            role.
        device: where to put the model (default CPU).
        expected: the class the model must be (``MinimalVAE.from_pretrained`` passes
            ``MinimalVAE``); a file holding another architecture is an error.

    Raises:
        CheckpointError: missing, corrupt or truncated file, no model of that role or class,
            architecture that does not match the stored tensors, or non-finite weights.
    """
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        name, arch, stored_role = _safetensors_arch(path)
        if role is not None and role != stored_role:
            raise _error(f"{path} holds the {stored_role!r} model, not the {role!r} one")
        _check_class(name, expected, str(path))
        model, state = _safetensors_model(path, name, arch)
        source = str(path)
    else:
        name, arch, state, role = _read_checkpoint(path, role, expected)
        source = f"{path} ({role})"
        _check_class(name, expected, source)
        model = _build_fitting(name, arch, {k: tuple(v.shape) for k, v in state.items()}, source)
    load_state_checked(model, state, source)  # dtypes, finite values
    if device is not None:
        model = model.to(device)
    return model.eval()  # type: ignore[return-value]


def _check_class(name: str, expected: type[VAEBase], source: str) -> None:
    cls = MODELS[name]
    if not issubclass(cls, expected):
        raise _error(f"{source} holds a {cls.__name__} ({name!r}), not a {expected.__name__}; "
                     f"load it with {cls.__name__}.from_pretrained")


# ---------------------------------------------------------------------- readers
def _safetensors_arch(path: Path) -> tuple[str, dict[str, Any], str]:
    """``(registry name, constructor kwargs, role)`` from a ``.safetensors`` file's metadata."""
    metadata = read_metadata(path)
    if "arch" not in metadata:
        raise _error(f"{path} has no 'arch' metadata, so the model cannot be rebuilt (was it "
                     f"written by save_pretrained? metadata keys: {sorted(metadata)})")
    arch = _metadata_json(metadata, "arch", path)
    name, kwargs = _split_arch(arch, f"{path} 'arch' metadata")
    version = metadata.get("format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise _error(f"{path} has format_version {version!r}; this hrm-vision reads up to "
                     f"{FORMAT_VERSION}: upgrade hrm-vision")
    return name, kwargs, metadata.get("role", DEFAULT_ROLES.get(name, name))


def _safetensors_model(path: Path, name: str,
                       arch: dict[str, Any]) -> tuple[VAEBase, dict[str, Tensor]]:
    """The model built from the metadata and the file's tensors, which are read only once their
    shapes fit the model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()  # noqa: SIM118
                      if not k.startswith(ADAPTER_PREFIX)}
            model = _build_fitting(name, arch, shapes, str(path))
            return model, {k: f.get_tensor(k) for k in shapes}
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _error(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                     f"{_first_line(exc)}") from exc


def _read_checkpoint(path: Path, role: str | None,
                     expected: type[VAEBase]) -> tuple[str, dict[str, Any], dict[str, Tensor], str]:
    """``(name, arch kwargs, state dict, role)`` of the chosen model of a ``.pth`` checkpoint."""
    payload = load_checkpoint(path, map_location="cpu")
    roles = roles_in(payload)
    described = ", ".join(f"{r} ({_arch_name(payload, r)})" for r in roles) or "no models"
    if role is None:
        fitting = [r for r in roles if expected is VAEBase
                   or (_arch_name(payload, r) in MODELS
                       and issubclass(MODELS[_arch_name(payload, r)], expected))]
        if not fitting:
            raise _error(f"{path} holds no {expected.__name__}; it holds: {described}")
        role = "student" if "student" in fitting else fitting[0]
    elif role not in roles:
        raise _error(f"{path} has no {role!r} model (keys {role}_state_dict and {role}_arch); "
                     f"it holds: {described}")
    source = f"{path} ({role})"
    name, kwargs = _split_arch(payload[f"{role}_arch"], f"{source} architecture")
    state = payload[f"{role}_state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise _error(f"{source}: {role}_state_dict must map names to tensors")
    return name, kwargs, dict(state), role


def _arch_name(payload: Mapping[str, Any], role: str) -> str:
    arch = payload.get(f"{role}_arch")
    return str(arch.get("name")) if isinstance(arch, Mapping) else "?"


def _split_arch(arch: Any, where: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, constructor kwargs)`` from a stored architecture dict, checked."""
    if not isinstance(arch, Mapping):
        raise _error(f"{where} must be a dict with a 'name', got {type(arch).__name__}")
    kwargs = dict(arch)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise _error(f"{where}: unknown model {name!r}; known: {sorted(MODELS)}")
    if not all(isinstance(v, (int, float, str, bool)) for v in kwargs.values()):
        raise _error(f"{where}: constructor arguments must be numbers or strings, got {kwargs}")
    return str(name), kwargs


def _build_fitting(name: str, arch: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
                   source: str) -> VAEBase:
    """Model ``name(**arch)`` (on the CPU, the caller's RNG untouched), checked to have exactly
    the parameter and buffer ``shapes`` stored in the file.

    Before anything is built, every integer argument must lie within the bound of
    :func:`hrm_vision.weights.check_arch_sizes` (the widest stored tensor that holds values),
    so a crafted architecture cannot make the constructor allocate absurd amounts of memory.
    """
    check_arch_sizes(arch, max((d for shape in shapes.values() if math.prod(shape)
                                  for d in shape), default=0), source)
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights randomly
            model = build_model(name, **arch)
    except Exception as exc:  # ValueError from the registry, or whatever a constructor raises
        raise _error(f"{source}: cannot rebuild the {name!r} model from {arch}: "
                     f"{_first_line(exc)}") from exc
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [f"{k}: file {shapes[k]} vs model {s}" for k, s in own.items()
                  if k in shapes and shapes[k] != s]
    if missing or unexpected or mismatched:
        parts = ([f"shape mismatches: {'; '.join(mismatched[:3])}"] if mismatched else []) \
            + ([f"missing tensors: {missing[:3]}"] if missing else []) \
            + ([f"unexpected tensors: {unexpected[:3]}"] if unexpected else [])
        raise _error(f"{source} does not fit {MODELS[name].__name__}({_kwargs(arch)}): "
                     + " | ".join(parts))
    return model


def _kwargs(arch: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arch.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _version() -> str:
    return __version__




def load_pretrained_adapter(path: str | os.PathLike[str]) -> torch.nn.Module:
    """The :class:`~hrm_vision.vae.adapter.LatentAdapter` stored in a ``.safetensors`` file by
    ``save_pretrained(..., adapter=...)``, in eval mode on the CPU, with the checks of
    :func:`hrm_vision.checkpoints.model_from_payload` (sizes bounded by the stored tensors
    before it is built, exact shapes, finite weights).

    Raises:
        CheckpointError: missing or unreadable file, or a file without an adapter.
    """
    from safetensors import safe_open

    path = Path(path)
    metadata = read_metadata(path)
    if "adapter_arch" not in metadata:
        raise _error(f"{path} holds no adapter (no 'adapter_arch' metadata; it holds the "
                     f"{metadata.get('role', '?')!r} model)")
    arch = _metadata_json(metadata, "adapter_arch", path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k[len(ADAPTER_PREFIX):]: f.get_tensor(k) for k in f.keys()  # noqa: SIM118
                     if k.startswith(ADAPTER_PREFIX)}
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _error(f"{path}: cannot read the adapter: {_first_line(exc)}") from exc
    payload = {f"{ADAPTER_ROLE}_state_dict": state, f"{ADAPTER_ROLE}_arch": arch}
    return model_from_payload(payload, ADAPTER_ROLE, source=str(path))


WEIGHTS_FILES.update(load=load_pretrained, save=save_pretrained)

__all__ = ["FORMAT_VERSION", "IMAGE_CONVENTION", "load_pretrained", "load_pretrained_adapter",
           "read_metadata", "save_pretrained"]
