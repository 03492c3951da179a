"""Files on disk: model weights, atomic writes, JSON, the one-writer folder lock, and the
one-line form of errors about files and configs.

**Checkpoints** (``.pth``, read with ``weights_only=True``) are dicts of CPU tensors, numbers,
strings, lists and dicts: ``format_version`` (absent reads as 1, a newer one is refused) and per
role (``"student"``, ``"teacher"``, ``"adapter"``) ``{role}_state_dict`` and ``{role}_arch``
(``{"name": <registry name>, **constructor kwargs}``; the adapter's has no name).
**Safetensors** files hold the tensors (the adapter's under ``adapter.``) and string metadata:
``arch``, ``role``, ``images`` (:data:`IMAGE_CONVENTION`), ``format_version``, ``library`` and
``adapter_arch``.

**Shipped weights** (:data:`WEIGHTS_DIR`, package data): ``NAME.safetensors`` with a sidecar
``NAME.json`` (the data the model was trained on, its licences, its measured PSNR);
``load("NAME")`` reads them by name.

Loading checks a file before building its model (docs/robustness.md); every problem is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._version import __version__
from .vae import MODELS, LatentAdapter, VAEBase, build_model, model_name

if TYPE_CHECKING:
    from pydantic import ValidationError

FORMAT_VERSION = 1  #: layout version of both formats
ADAPTER_ROLE = "adapter"  #: the latent adapter's role (its arch has no registry name)
SAFETENSORS_SUFFIX = ".safetensors"  #: any other suffix is read as a ``.pth`` checkpoint
IMAGE_CONVENTION = "float RGB in [0, 1], NCHW, H and W divisible by 8"
ADAPTER_PREFIX = "adapter."  #: name prefix of the adapter's tensors in a ``.safetensors`` file
MAX_METADATA_CHARS = 1 << 16  #: metadata keys and values together
MAX_NESTING = 32  #: of lists, tuples and dicts in a loaded file (this package writes 4)
MAX_ARCH_INT = 1 << 16  #: largest stored integer architecture argument (these models: 512)
WEIGHTS_DIR = Path(__file__).with_name("weights")  #: the shipped ``NAME.safetensors`` files
WEIGHTS_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  #: what :func:`load` takes for a shipped name
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  #: :func:`atomic_write`'s files


class CheckpointError(ValueError):
    """A file that is missing, unreadable, not a checkpoint, or does not fit the model."""


# ---------------------------------------------------------------------- checks
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _listed(items: list[str]) -> str:
    """The first five of ``items``, comma-separated, and how many more."""
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _children(value: Any) -> Iterable[tuple[Any, Any]] | None:
    """The ``(key, item)`` pairs of a dict, list or tuple; None for anything else."""
    if isinstance(value, dict):
        return value.items()
    return enumerate(value) if isinstance(value, (list, tuple)) else None


def check_nesting(value: Any, source: str, limit: int = MAX_NESTING) -> None:
    """A ``CheckpointError`` when the lists, tuples and dicts of ``value`` nest more than
    ``limit`` levels; walks without recursion, so 100,000 levels are refused too."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = _children(item)
        if children is not None and depth >= limit:
            raise CheckpointError(f"{source} is nested too deep: more than {limit} levels of "
                                  "lists and dicts (a crafted or corrupt file?)")
        stack.extend((child, depth + 1) for _, child in children or ())


def non_finite_tensors(value: Any, prefix: str = "") -> list[str]:
    """The ``a.b.c`` paths (through dicts, lists and tuples) of every floating-point tensor in
    ``value`` holding a NaN or an infinity."""
    if isinstance(value, Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return [] if finite else [prefix or "<tensor>"]
    return [bad for k, v in _children(value) or ()
            for bad in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def check_finite(value: Any, message: str, suffix: str = "") -> None:
    """A ``CheckpointError`` ``"{message} {tensors}{suffix}"`` naming the non-finite
    floating-point tensors of ``value``, if any."""
    bad = non_finite_tensors(value)
    if bad:
        raise CheckpointError(f"{message} {_listed(bad)}{suffix}")


def check_state_dict(state: Any, source: str) -> dict[str, Tensor]:
    """``state`` as a dict of tensors; a ``CheckpointError`` when it maps anything else."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: the state dict must map names to tensors, got "
                              f"{type(state).__name__}")
    wrong = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
             if not isinstance(k, str) or not isinstance(v, Tensor)]
    if wrong:
        raise CheckpointError(f"{source}: the state dict must map names to tensors; not a "
                              f"tensor: {_listed(wrong)}")
    return dict(state)


def _check_layout(module: nn.Module,
                  stored: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
                  source: str) -> None:
    """A ``CheckpointError`` unless ``stored`` (name -> (shape, dtype or None: not checked))
    has exactly the module's keys and shapes, and dtypes that fit: any floating dtype for a
    floating tensor (cast on load), exactly its own for an integer or bool one."""
    own = module.state_dict()
    problems = {
        "wrong dtypes (floating weights must be stored as floats, integer buffers as the same "
        "integers)": [f"{k}: checkpoint {dtype} vs model {v.dtype}" for k, v in own.items()
                      if (dtype := stored.get(k, ((), None))[1]) is not None
                      and not (dtype.is_floating_point if v.is_floating_point()
                               else dtype == v.dtype)],
        "shape mismatches": [f"{k}: checkpoint {stored[k][0]} vs model {tuple(v.shape)}"
                             for k, v in own.items()
                             if k in stored and stored[k][0] != tuple(v.shape)],
        "missing keys": sorted(set(own) - set(stored)),
        "unexpected keys": sorted(set(stored) - set(own)),
    }
    parts = [f"{label}: {_listed(items)}" for label, items in problems.items() if items]
    if parts:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: "
                              + " | ".join(parts))


def check_fits(module: nn.Module, state: Any, source: str) -> dict[str, Tensor]:
    """``state`` checked to load into ``module`` (a dict of finite tensors with exactly its
    keys, shapes and fitting dtypes), cast to the module's dtypes."""
    state = check_state_dict(state, source)
    _check_layout(module, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, source)
    check_finite(state, f"{source} holds NaN or infinite weights in")
    own = module.state_dict()
    return {k: v.to(own[k].dtype) for k, v in state.items()}


def load_state_checked(module: nn.Module, state: Any, source: str) -> None:
    """``module.load_state_dict(state)`` after :func:`check_fits`."""
    module.load_state_dict(check_fits(module, state, source))


def check_arch_sizes(kwargs: Mapping[str, Any], widest: int, source: str,
                     label: str = "architecture") -> None:
    """Refuse integer arguments outside ``[0, min(widest, MAX_ARCH_INT)]``: no size of these
    models exceeds the widest stored tensor."""
    limit = min(widest, MAX_ARCH_INT)
    for key, value in kwargs.items():
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            raise CheckpointError(f"{source}: {label} {key}={value} is outside [0, {limit}], "
                                  "the widest stored tensor that holds values")


def check_arch(arch: Any, widest: int, source: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, constructor kwargs)`` of a stored architecture: a dict with a
    registered ``name`` and number or string values, sizes within :func:`check_arch_sizes`."""
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
    check_arch_sizes(kwargs, widest, source)
    return name, kwargs


def check_adapter_arch(arch: Any, widest: int, source: str) -> dict[str, int | bool]:
    """The constructor kwargs of a stored ``adapter_arch``: positive integer sizes
    (``student_dim``, ``teacher_dim``) within :func:`check_arch_sizes`, and optionally the bool
    ``vector``."""
    sizes = {k: v for k, v in arch.items() if k != "vector"} if isinstance(arch, Mapping) else {}
    if not sizes or not all(isinstance(k, str) and isinstance(v, int)
                            and not isinstance(v, bool) and v >= 1 for k, v in sizes.items()):
        raise CheckpointError(f"{source}: adapter_arch {arch!r} must map names to positive "
                              "integer sizes")
    if not isinstance(arch.get("vector", False), bool):
        raise CheckpointError(f"{source}: adapter_arch 'vector' must be true or false, got "
                              f"{arch['vector']!r}")
    check_arch_sizes(sizes, widest, source, label="adapter_arch")
    return dict(arch)


def check_format_version(version: Any, source: str) -> int:
    """A file's ``format_version``; a ``CheckpointError`` for a newer or malformed one."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{source}: format_version must be a positive integer, "
                              f"got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source} has checkpoint format_version {version}, newer than the "
                              f"version {FORMAT_VERSION} this hrm_vision reads; upgrade hrm_vision "
                              "to load it")
    return version


def describe_validation_error(exc: ValidationError, known: Iterable[str] | None = None) -> str:
    """Every problem of a pydantic ``ValidationError`` on one ``"; "``-separated line: ``field:
    message (got value)``, or ``unknown key 'name'`` followed by the ``known`` keys."""
    known_keys = ", ".join(known) if known is not None else None
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {field!r}"
                         + (f" (known keys: {known_keys})" if known_keys else ""))
        else:
            lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


# ---------------------------------------------------------------------- writes
def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the first one in its cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def current_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary ``.{name}.XXXXXXXX.tmp`` next to ``path`` (parents
    created, permissions ``0o666`` less the umask), fsync it and ``os.replace`` it onto ``path``;
    returns ``path``. On a failure ``path`` is untouched, the temporary file removed, and an
    ``OSError`` behind it (even wrapped by ``write``) is raised again naming ``path``."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        reason = cause.strerror or str(cause) or type(cause).__name__
        if cause.errno is None:
            raise type(cause)(f"cannot write {path}: {reason}") from exc
        raise type(cause)(cause.errno, f"cannot write {path}: {reason}") from exc
    return path


class FolderLockedError(OSError):
    """Another live process holds the folder's :class:`FolderLock`; the message names it."""


class FolderLock:
    """An exclusive lock on ``folder`` for one writer, from :meth:`acquire` (or ``with``) to
    :meth:`release`: ``fcntl.flock`` on ``folder/.lock``, which records the holder's pid, host and
    start time for the :class:`FolderLockedError` another process gets; the kernel drops the lock
    of a holder that dies."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str], purpose: str = "writing") -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        import fcntl

        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                try:
                    info = json.loads(holder)
                    holder = (f"pid {info['pid']} on {info['host']}, {info['purpose']} since "
                              f"{info['started']}")
                except (ValueError, KeyError, TypeError):
                    holder = "holder unknown"
                raise FolderLockedError(f"{self.folder} is in use by another process ({holder}); "
                                        "wait for it to finish, or use another folder") from None
            except BaseException:
                os.close(fd)
                raise
            # release() deletes the file while locked: lock again unless ours is still there
            with contextlib.suppress(FileNotFoundError):
                now, mine = os.stat(self.path), os.fstat(fd)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "purpose": self.purpose}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # still locked: no writer holds the file being deleted
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete (and return) the temporary files of :func:`atomic_write` that killed
        processes left in the folder; only the lock's holder may (a ``RuntimeError`` else)."""
        if self._fd is None:
            raise RuntimeError(f"remove_stale_temporaries needs the lock on {self.folder}")
        removed = sorted(entry for entry in self.folder.iterdir()
                         if TEMPORARY_NAME.match(entry.name) and entry.is_file())
        for entry in removed:
            entry.unlink(missing_ok=True)
        return removed


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike[str], indent: int = 1) -> Path:
    """Atomically write ``data`` as JSON; NaN/inf become ``null`` so the file stays valid JSON."""
    return write_text(json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n", path)


# ---------------------------------------------------------------------- checkpoints (.pth)
def to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside its dicts, lists and tuples detached and on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        items = [to_cpu(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return {k: to_cpu(v) for k, v in value.items()} if isinstance(value, dict) else value


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    inner = getattr(module, "module", None)
    if not isinstance(inner, nn.Module):
        inner = getattr(module, "_orig_mod", None)
    return unwrap(inner) if isinstance(inner, nn.Module) else module


def model_entry(model: VAEBase, role: str) -> dict[str, Any]:
    """``{role}_state_dict`` (CPU tensors, wrappers unwrapped) and ``{role}_arch`` of ``model``."""
    model = unwrap(model)  # type: ignore[assignment]
    arch = {"name": model_name(model), **model.arch_config()}
    return {f"{role}_state_dict": to_cpu(model.state_dict()), f"{role}_arch": arch}


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str],
                    require_finite: bool = False) -> Path:
    """Write ``payload`` (tensors moved to the CPU, ``format_version`` added) to ``path``
    atomically; with ``require_finite`` a NaN or infinity anywhere is a ``CheckpointError``."""
    if require_finite:
        check_finite(payload, f"refusing to write {path}: NaN or infinite values in",
                     "; the previous file is kept")
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
    """A checkpoint dict loaded with ``weights_only=True``, its nesting and ``format_version``
    checked; every failure is a ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all become one message
        first = _torch_reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "global" in first.lower():
            raise CheckpointError(
                f"{path} holds pickled Python objects, which are refused (only tensors, numbers, "
                f"strings, lists and dicts load safely): {first}") from exc
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or "
                              f"truncated file?): {first}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    check_nesting(payload, str(path))
    check_format_version(payload.get("format_version", 1), str(path))
    return payload


def roles_in(payload: dict[str, Any]) -> list[str]:
    """Roles with a stored model in a checkpoint dict (e.g. ``["student", "teacher"]``)."""
    roles = [k.removesuffix("_state_dict") for k in payload if k.endswith("_state_dict")]
    return sorted(role for role in roles if f"{role}_arch" in payload)


def _build(role: str, arch: Any, shapes: Mapping[str, tuple[int, ...]],
           source: str) -> nn.Module:
    """The ``role`` model rebuilt from its stored ``arch`` checked against the stored ``shapes``,
    the caller's RNG untouched."""
    # an empty tensor of shape (0, 200000) stores nothing and lifts no limit
    widest = max((d for s in shapes.values() if math.prod(s) for d in s), default=0)
    build: Callable[..., nn.Module]
    if role == ADAPTER_ROLE:
        kwargs: dict[str, Any] = check_adapter_arch(arch, widest, source)
        build = LatentAdapter
    else:
        name, kwargs = check_arch(arch, widest, source)
        build = partial(build_model, name)
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises weights randomly
            return build(**kwargs)
    except Exception as exc:  # what a constructor raises for arguments it does not take
        raise CheckpointError(f"{source}: cannot rebuild the {role} model: "
                              f"{_first_line(exc)}") from exc


def model_from_payload(payload: dict[str, Any], role: str = "student",
                       source: str = "checkpoint") -> VAEBase | LatentAdapter:
    """The ``role`` model of a loaded checkpoint dict, checked, in eval mode on the CPU; a
    ``CheckpointError`` listing the roles it has when it lacks ``role``."""
    if role not in roles_in(payload):
        raise CheckpointError(f"{source} has no {role!r} model (keys {role}_state_dict and "
                              f"{role}_arch); it holds: {roles_in(payload) or 'no models'}")
    where = f"{source} ({role})"
    state = check_state_dict(payload[f"{role}_state_dict"], where)
    model = _build(role, payload[f"{role}_arch"], {k: tuple(v.shape) for k, v in state.items()},
                   where)
    load_state_checked(model, state, where)
    return model.eval()  # type: ignore[return-value]


def adapter_from_payload(payload: dict[str, Any], source: str = "checkpoint"
                         ) -> LatentAdapter | None:
    """The adapter of a checkpoint dict (:func:`model_from_payload`), None when it has none."""
    has = ADAPTER_ROLE in roles_in(payload)
    return model_from_payload(payload, ADAPTER_ROLE, source) if has else None


# ---------------------------------------------------------------------- safetensors
def save(model: VAEBase, path: str | os.PathLike[str], role: str | None = None,
         adapter: nn.Module | None = None) -> Path:
    """Write ``model``'s (and ``adapter``'s) weights and architecture to a ``.safetensors`` file,
    atomically, under ``role`` (default ``"student"``, ``"teacher"`` for a teacher). A
    ``ValueError`` for another suffix, a ``CheckpointError`` for a NaN or infinite weight."""
    from safetensors.torch import save as serialise

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"hrm_vision.save writes {SAFETENSORS_SUFFIX} files, got {path}")
    model = unwrap(model)  # type: ignore[assignment]
    name = model_name(model)
    parts = {"": model} if adapter is None else {"": model, ADAPTER_PREFIX: unwrap(adapter)}
    tensors = {prefix + k: v.detach().to("cpu").contiguous()
               for prefix, part in parts.items() for k, v in part.state_dict().items()}
    check_finite(tensors, f"refusing to save {path}: NaN or infinite weights in")
    metadata = {"format": "pt", "images": IMAGE_CONVENTION,
                "arch": json.dumps({"name": name, **model.arch_config()}, sort_keys=True),
                "role": role or ("teacher" if "teacher" in name else "student"),
                "format_version": str(FORMAT_VERSION), "library": f"hrm-vision {__version__}"}
    if adapter is not None:
        metadata["adapter_arch"] = json.dumps(unwrap(adapter).arch_config(), sort_keys=True)
    data = serialise(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                           f"{_first_line(exc)}")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (at most :data:`MAX_METADATA_CHARS`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, UnicodeDecodeError, ...
        raise _unreadable(path, exc) from exc
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if size > MAX_METADATA_CHARS:
        raise CheckpointError(f"metadata of {path} is too large: {size} characters, at most "
                              f"{MAX_METADATA_CHARS} (a crafted file?)")
    return metadata


def _metadata_json(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    """The JSON value of metadata ``key``, nested at most two levels."""
    where = f"the {key!r} metadata of {path}"
    if key not in metadata:
        raise CheckpointError(f"{path} has no {key!r} metadata, so the model cannot be rebuilt "
                              f"(was it written by hrm_vision.save? metadata keys: "
                              f"{sorted(metadata)})")
    try:
        value = json.loads(metadata[key])
    except RecursionError:
        raise CheckpointError(f"{where} is nested too deep (a crafted file?)") from None
    except ValueError as exc:  # JSONDecodeError, a 5000-digit number
        raise CheckpointError(f"{where} is not valid JSON ({_first_line(exc)})") from exc
    check_nesting(value, where, limit=2)
    return value


def _load_safetensors(path: Path, role: str) -> nn.Module:
    """The ``role`` model of a ``.safetensors`` file: the stored VAE when ``role`` is its
    stored role, or the adapter stored beside it."""
    from safetensors import safe_open

    metadata = read_metadata(path)
    version = metadata.get("format_version", str(FORMAT_VERSION))
    check_format_version(int(version) if version.isdigit() else version, str(path))
    if role == ADAPTER_ROLE:
        if "adapter_arch" not in metadata:
            raise CheckpointError(f"{path} holds no adapter (no 'adapter_arch' metadata; it "
                                  f"holds the {metadata.get('role', '?')!r} model)")
        arch = _metadata_json(metadata, "adapter_arch", path)
    else:
        arch = _metadata_json(metadata, "arch", path)
        stored = metadata.get("role", role)  # a file without a role is taken for what is asked
        if role != stored:
            raise CheckpointError(f"{path} holds the {stored!r} model, not the {role!r} one")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys()  # noqa: SIM118
                    if k.startswith(ADAPTER_PREFIX) == (role == ADAPTER_ROLE)]
            strip = len(ADAPTER_PREFIX) if role == ADAPTER_ROLE else 0
            shapes = {k[strip:]: tuple(f.get_slice(k).get_shape()) for k in keys}
            model = _build(role, arch, shapes, str(path))
            # keys and shapes before any tensor data is read (dtypes are checked on load)
            _check_layout(model, {k: (s, None) for k, s in shapes.items()}, str(path))
            state = {k[strip:]: f.get_tensor(k) for k in keys}
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _unreadable(path, exc) from exc
    load_state_checked(model, state, str(path))
    return model.eval()


def shipped_weights() -> list[str]:
    """The names of the weights shipped in :data:`WEIGHTS_DIR` (sorted)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob(f"*{SAFETENSORS_SUFFIX}"))


def weights_path(name: str) -> Path:
    """``WEIGHTS_DIR/NAME.safetensors``; a ``CheckpointError`` listing the shipped names when
    there is none."""
    path = WEIGHTS_DIR / f"{name}{SAFETENSORS_SUFFIX}"
    if not path.is_file():
        raise CheckpointError(f"no shipped weights named {name!r} in {WEIGHTS_DIR}; shipped: "
                              f"{shipped_weights() or 'none'} (or give a file path)")
    return path


def load(path: str | os.PathLike[str], role: str | None = None,
         device: str | torch.device | None = None) -> VAEBase | LatentAdapter:
    """The ``role`` model (``"student"``, ``"teacher"`` or ``"adapter"``, the
    :class:`~hrm_vision.vae.LatentAdapter`) stored at ``path``, in eval mode, on the CPU (or
    ``device``): a ``.safetensors`` file of :func:`save`, any other suffix a ``.pth``
    checkpoint, or a bare name (``"compact_student"``, ``"tinyvae"``; no such file here) the
    shipped weights :func:`weights_path` (``role`` default: the stored one; for files
    ``"student"``). Every problem is a :class:`CheckpointError` naming the file."""
    if isinstance(path, str) and WEIGHTS_NAME.match(path) and not Path(path).exists():
        path = weights_path(path)
        role = role or read_metadata(path).get("role", "student")
    path, role = Path(path), role or "student"
    if path.suffix == SAFETENSORS_SUFFIX:
        model = _load_safetensors(path, role)
    else:
        model = model_from_payload(load_checkpoint(path), role, source=str(path))
    return model if device is None else model.to(device)  # type: ignore[return-value]
