"""The reference IRP host loop: registry plugins by name, a step budget, JSON-lines telemetry.

>>> loop = Orchestrator.from_registry({"tinyvae": {"checkpoint": "checkpoints/tinyvae_best.pth"}},
...                                   step_budget=10, telemetry=open("telemetry.jsonl", "w"))
>>> results = loop.run(frames)       # one {plugin name: IRPResult} per input

Command line::

    python -m hrm_vision.irp.host --list
    python -m hrm_vision.irp.host --plugin tinyvae \\
        --config tinyvae='{"checkpoint": "checkpoints/tinyvae_best.pth"}' \\
        --num-crops 8 --step-budget 10 --telemetry telemetry.jsonl

The step budget is the number of states each input may use, split evenly among the plugins
(each gets at least 1, its initial guess). ``--images`` files are read by bit depth (8-bit,
16-bit, float in [0, 1]; see :mod:`hrm_vision.data`) into float RGB tensors.

A plugin that fails (at import, in its factory, or on an input) is reported and the others go
on; see :class:`Orchestrator` and :func:`main` for the exit statuses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .base import IRPPlugin, IRPResult
from .guards import check_energies, os_exit_raises, private_copy, refuse_output_over_inputs
from .plugins import (
    PLUGIN_FAILURES,
    PluginError,
    PluginRegistry,
    PluginWarning,
    describe,
    get_registry,
)
from .telemetry import error_record, to_jsonl, write_jsonl

#: The command's name in messages (``python -m hrm_vision.irp.host`` is the same command).
PROG = "hrm-vision irp"


class Orchestrator:
    """Runs IRP plugins on a stream of inputs under a step budget, one plugin's failure isolated
    from the others.

    A plugin that raises (any exception, ``SystemExit``, or calls ``os._exit``: see
    :func:`~.guards.os_exit_raises`) while running on an input is reported and the run goes
    on: the other plugins' results for that input come back, and the failing plugin is tried
    again on the next input. Each failure is a :class:`PluginError` in
    :attr:`errors` (and in the registry's ``errors`` when there is one), a :class:`PluginWarning`,
    and an error record in the telemetry.

    Args:
        plugins: plugin instances by name, run in this order on every input.
        step_budget: states per input over all plugins (``>= 1``), split evenly.
        telemetry: a text stream receiving one validated JSON line per (input, plugin) run, and
            one error record per failure.
        registry: the :class:`PluginRegistry` the plugins came from; failures are also
            reported there.
        time_budget: seconds one plugin may take on one input (``None``: no limit); a run that
            took longer is a failure (:class:`TimeBudgetError`) and its result is dropped. The
            time is measured when the run returns: a plugin that never returns is not stopped.

    Attributes:
        errors: every failure reported by this orchestrator, in order.
        exceptions: the exception behind each of ``errors`` (same order).
    """

    def __init__(self, plugins: Mapping[str, IRPPlugin], step_budget: int,
                 telemetry: IO[str] | None = None,
                 registry: PluginRegistry | None = None,
                 time_budget: float | None = None) -> None:
        if not plugins:
            raise ValueError("the orchestrator needs at least one plugin")
        if step_budget < 1:
            raise ValueError(f"step_budget must be at least 1, got {step_budget}")
        if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds, got "
                             f"{time_budget}")
        self.time_budget = time_budget
        self.plugins = dict(plugins)
        self.step_budget = step_budget
        self.telemetry = telemetry
        self.registry = registry
        self.errors: list[PluginError] = []
        self.exceptions: list[BaseException] = []

    @classmethod
    def from_registry(cls, configs: Mapping[str, dict[str, Any] | None], step_budget: int,
                      telemetry: IO[str] | None = None,
                      registry: PluginRegistry | None = None,
                      time_budget: float | None = None) -> Orchestrator:
        """Create each named plugin from its plain-dict config through ``registry`` (default:
        :func:`get_registry`).

        The registry's load failures (plugins that failed to import or register) are written to the
        telemetry first. A plugin whose creation fails (unknown name, bad config, unloadable
        checkpoint, a factory that raises) is reported the same way and left out; the others
        run. When no plugin can be created, the first failure is raised (a ``ValueError`` for
        the usual cases: :class:`PluginConfigError`, ``CheckpointError``,
        :class:`UnknownPluginError`).
        """
        registry = registry or get_registry()
        registry.list_plugins()  # runs every module's hook, so failures there are known too
        for error in list(registry.errors):  # plugins that failed to import or register
            if error.stage in ("import", "register"):
                _write(telemetry, _error_record(error, "PluginLoadError"))
        plugins: dict[str, IRPPlugin] = {}
        failures: list[tuple[PluginError, BaseException]] = []
        for name, config in configs.items():
            try:
                plugins[name] = registry.create(name, config)
            except PLUGIN_FAILURES as exc:
                source = _source_of(registry, name)
                error = registry.report(name, source, describe(exc), stage="factory")
                _write(telemetry, _error_record(error, type(exc).__name__))
                failures.append((error, exc))
        if not plugins:
            first_error, first = failures[0]
            if isinstance(first, Exception):
                raise first
            raise PluginRunError(f"plugin {first_error.name!r} could not be created: "
                                 f"{first_error.message}") from first
        orchestrator = cls(plugins, step_budget, telemetry, registry, time_budget)
        orchestrator.errors.extend(error for error, _ in failures)
        orchestrator.exceptions.extend(exc for _, exc in failures)
        return orchestrator

    @property
    def steps_per_plugin(self) -> int:
        """``max_steps`` each plugin gets for one input."""
        return max(1, self.step_budget // len(self.plugins))

    def run(self, inputs: Iterable[Any],
            task_ctx: dict[str, Any] | None = None) -> list[dict[str, IRPResult]]:
        """Run every plugin on every input; returns one ``{name: IRPResult}`` per input.

        A plugin that failed on an input is absent from that input's dict (see the class
        docstring); :attr:`errors` says why. A telemetry record that breaks the schema counts
        as a failure of the plugin that produced it.
        """
        results = []
        for index, x in enumerate(inputs):
            per_input = {}
            for name, plugin in self.plugins.items():
                try:
                    start = time.perf_counter()
                    with os_exit_raises():
                        result = plugin.run(private_copy(x), task_ctx,
                                            max_steps=self.steps_per_plugin, input_id=index)
                    self._check_time(time.perf_counter() - start)
                    check_energies(result)
                    line = to_jsonl(result.telemetry) if self.telemetry is not None else None
                except PLUGIN_FAILURES as exc:
                    self._fail(name, plugin, exc, index)
                    continue
                if line is not None:
                    self.telemetry.write(line)  # type: ignore[union-attr]
                    self.telemetry.flush()  # type: ignore[union-attr]
                per_input[name] = result
            results.append(per_input)
        return results

    def _check_time(self, seconds: float) -> None:
        if self.time_budget is not None and seconds > self.time_budget:
            raise TimeBudgetError(f"took {seconds:.3g} s, over the time budget of "
                                  f"{self.time_budget:g} s")

    def _fail(self, name: str, plugin: IRPPlugin, exc: BaseException, index: int) -> None:
        source = type(plugin).__module__
        message = describe(exc)
        if self.registry is not None:
            error = self.registry.report(name, source, message, stage="run", input_id=index)
        else:
            error = PluginError(name, source, message, "run", index)
            warnings.warn(f"IRP plugin {name!r} ({source}) failed on input {index}: {message}",
                          PluginWarning, stacklevel=3)
        self.errors.append(error)
        self.exceptions.append(exc)
        _write(self.telemetry, _error_record(error, type(exc).__name__))


class TimeBudgetError(RuntimeError):
    """A plugin's run on one input took longer than the orchestrator's ``time_budget``."""


class PluginRunError(ValueError):
    """No plugin could be created (the message gives the first plugin's failure)."""


def _source_of(registry: PluginRegistry, name: str) -> str:
    try:
        return registry.get(name).source
    except PLUGIN_FAILURES:
        return "registry"


def _error_record(error: PluginError, error_type: str) -> dict[str, Any]:
    stage = error.stage if error.stage in ("import", "register", "factory", "run") else "import"
    return error_record(error.name, stage, error_type, error.message, source=error.source,
                        input_id=error.input_id)


def _write(stream: IO[str] | None, record: dict[str, Any]) -> None:
    if stream is not None:
        write_jsonl(record, stream)


# ---------------------------------------------------------------------- command line
def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true",
                        help="list the registered plugins and any that failed to load, then exit")
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="plugin to run (repeatable), by registry name")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="config of plugin NAME: a JSON object, or the path of a JSON file")
    parser.add_argument("--images", nargs="*", default=[], metavar="PATH",
                        help="image files (run as uint8 RGB frames, one input each)")
    parser.add_argument("--num-crops", type=int, default=8,
                        help="without --images: this many held-out photos validation crops")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="crops per input (batch) when using photos crops")
    parser.add_argument("--step-budget", type=int, default=10, help="states per input")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="seconds one plugin may take on one input; a longer run counts as "
                             "a failure (default: no limit; a plugin that never returns is not "
                             "stopped)")
    parser.add_argument("--telemetry", type=Path, default=None,
                        help="JSON-lines output file (default: standard output)")
    return parser


def _parse_configs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    configs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--config expects NAME=JSON or NAME=FILE.json, got {item!r}")
        text = Path(value).read_text() if value.endswith(".json") else value
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {name}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise ValueError(f"--config {name}: JSON nested too deeply") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {name}: expected a JSON object, got "
                             f"{type(config).__name__}")
        configs[name] = config
    return configs


def _registry_for(names: Sequence[str]) -> PluginRegistry:
    """A registry with the built-in plugins and only the entry points named in ``names`` (or,
    when set, those of the allow-list variable): an installed package that is not asked for is
    not imported. Only when a name is still unknown are the other entry points loaded (an entry
    point may register plugins under other names)."""
    from importlib import metadata

    from .plugins import ALLOW_ENV, ENTRY_POINT_GROUP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # printed by the caller, one line each
        registry = PluginRegistry(load_entry_points=False)
        if ALLOW_ENV in os.environ:
            registry.load_entry_points()
            return registry
        builtin = set(registry.list_plugins())
        installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
        registry.load_entry_points([n for n in names if n in installed and n not in builtin])
        if set(names) - set(registry.list_plugins()):
            registry.load_entry_points()
    return registry


def read_frame(path: str | Path) -> Any:
    """An image file as a ``(3, H, W)`` float RGB tensor in [0, 1], scaled by its bit depth.

    Raises ``OSError`` (missing or undecodable file), ``ValueError`` (pixels of unknown scale,
    see :mod:`hrm_vision.data`), ``MissingExtraError`` without pillow.
    """
    import torch

    from ..data import read_image

    array = read_image(path, purpose="reading --images files")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _inputs(args: argparse.Namespace) -> list[Any]:
    if args.images:
        return [read_frame(p) for p in args.images]
    from ..data import PhotoCrops

    crops = PhotoCrops("val", num_crops=args.num_crops).images_uint8.float() / 255.0
    return list(crops.split(args.batch_size))


def _run(argv: Sequence[str] | None, prog: str) -> int:
    args = setup_args().parse_args(argv)
    if args.list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # printed below, one line each
            registry = get_registry()
        for name, info in sorted(registry.list_plugins().items()):
            print(f"{name:12s} {info.kind:12s} {info.description}  [{info.source}]")
        for err in registry.errors:
            print(f"FAILED {err.name} ({err.source}): {err.message}")
        return 0
    if not args.plugin:
        raise ValueError("give at least one --plugin NAME (see --list)")
    for option, value in (("--batch-size", args.batch_size), ("--num-crops", args.num_crops)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    configs = _parse_configs(args.config)
    unknown = sorted(set(configs) - set(args.plugin))
    if unknown:
        raise ValueError(f"--config given for {unknown}, which are not among --plugin")
    if args.telemetry is not None:
        refuse_output_over_inputs(args.telemetry, args, configs)
    registry = _registry_for(args.plugin)
    inputs = _inputs(args)  # before the telemetry file is created: a bad image leaves none
    stream = open(args.telemetry, "w") if args.telemetry else sys.stdout  # noqa: SIM115
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            orch = Orchestrator.from_registry({n: configs.get(n) for n in args.plugin},
                                              args.step_budget, stream, registry,
                                              args.time_budget)
            results = orch.run(inputs)
    finally:
        if args.telemetry:
            stream.close()
    _raise_if_nothing_ran(orch, results, args)
    for err in [e for e in registry.errors if e.stage in ("import", "register")] + orch.errors:
        where = f" on input {err.input_id}" if err.input_id is not None else ""
        print(f"{prog}: warning: plugin {err.name!r} failed ({err.stage}){where}: "
              f"{err.message}", file=sys.stderr)
    for name in orch.plugins:
        records = [r[name].telemetry for r in results if name in r]
        first = [t["energy_initial"] for t in records if t["energy_initial"] is not None]
        final = [t["energy_final"] for t in records if t["energy_final"] is not None]
        energies = (f", mean energy {np.mean(first):.6g} -> {np.mean(final):.6g}"
                    if first and final else "")
        print(f"{name}: {len(records)} of {len(results)} inputs{energies}", file=sys.stderr)
    return 1 if orch.errors else 0


class NothingRanError(ValueError):
    """Every plugin failed on every input, each for an expected reason (a rejected input)."""


def _raise_if_nothing_ran(orch: Orchestrator, results: list[dict[str, IRPResult]],
                          args: argparse.Namespace) -> None:
    """Turn "every run failed, each with an expected error" into one error (status 2)."""
    from ..cli import EXPECTED_ERRORS

    runs = [(e, x) for e, x in zip(orch.errors, orch.exceptions, strict=True) if e.stage == "run"]
    if any(results) or not runs or not all(isinstance(x, EXPECTED_ERRORS) for _, x in runs):
        return
    error, exc = runs[0]
    label = (args.images[int(error.input_id)] if args.images and error.input_id is not None
             else f"input {error.input_id}")
    more = f" (+{len(runs) - 1} more failed runs)" if len(runs) > 1 else ""
    raise NothingRanError(f"{label}: plugin {error.name!r} refused it: {describe(exc)}{more}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status.

    0: every plugin ran on every input; 1: some plugin failed (each failure is one warning
    line on standard error and an error record in the telemetry) but the others ran; 2: an
    expected error stopped the run (bad config, unknown plugin, unloadable checkpoint,
    unreadable image, missing extra, or every run refused its input with a ``ValueError``),
    printed as one line. Anything else is a bug: traceback.
    """
    from ..cli import run_main

    return run_main(PROG, lambda a: _run(a, PROG), argv)


if __name__ == "__main__":
    sys.exit(main())
