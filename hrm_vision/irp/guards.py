"""What the IRP host does to keep plugins and runs apart: each plugin gets its own copy of an
input, a result with a non-finite energy is a failure, ``os._exit`` called during a run is an
exception of that run, and the telemetry file is never one of the run's inputs."""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .base import IRPResult


def private_copy(x: Any) -> Any:
    """A copy of input ``x`` for one plugin, so that a plugin changing its input in place cannot
    change what the next plugin sees (tensors and arrays cloned, anything else deep-copied)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    return copy.deepcopy(x)


class NonFiniteEnergyError(ValueError):
    """A plugin's result holds a NaN or infinite (or missing) energy."""


def check_energies(result: IRPResult) -> None:
    """Raise :class:`NonFiniteEnergyError` unless every state of ``result`` has a finite
    energy (the telemetry would otherwise carry nulls, and the run look fine)."""
    for state in [*result.history, result.state]:
        value = state.energy_val
        if value is None or not math.isfinite(float(value)):
            raise NonFiniteEnergyError(f"state {state.step_idx} has energy {value} (not a finite "
                                       "number)")


class HardExitError(SystemExit):
    """A plugin called ``os._exit(status)`` while the host ran it (see :func:`os_exit_raises`)."""


@contextlib.contextmanager
def os_exit_raises() -> Iterator[None]:
    """Inside, ``os._exit(status)`` called by this process raises :class:`HardExitError` instead
    of ending it, so the host reports the plugin's failure and goes on.

    A forked child's call (``multiprocessing``) still ends the child. Not caught: ``posix._exit``,
    an ``_exit`` bound before entering (``from os import _exit`` at a plugin's import), signals,
    crashes: these end the host at once.
    """
    real, pid = os._exit, os.getpid()

    def _exit(status: int) -> NoReturn:
        if os.getpid() != pid:
            real(status)
        raise HardExitError(f"the plugin called os._exit({status}); the host stopped it")

    os._exit = _exit
    try:
        yield
    finally:
        os._exit = real


def input_files(args: argparse.Namespace, configs: dict[str, dict[str, Any]]) -> list[str]:
    """Every file the run reads: ``--images``, ``--config`` files, and any string in a plugin
    config that names an existing file (checkpoints)."""
    files = list(args.images)
    files += [v for _, _, v in (c.partition("=") for c in args.config) if v.endswith(".json")]

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    files += [s for config in configs.values() for s in strings(config)]
    return files


def refuse_output_over_inputs(output: Path, args: argparse.Namespace,
                               configs: dict[str, dict[str, Any]]) -> None:
    """Raise ``ValueError`` when ``output`` is (or links to) a file the run reads."""
    if not output.exists():
        return
    for name in input_files(args, configs):
        try:
            same = os.path.samefile(output, name)
        except (OSError, ValueError):
            continue
        if same:
            raise ValueError(f"--telemetry {output} is an input of the run ({name}); it would "
                             "be written over: choose another file")
