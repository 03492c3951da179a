"""The reference IRP host: registry plugins by name, a step budget, JSON-lines telemetry.

``hrm-vision irp`` (:func:`command`) runs it on ``--images`` files or held-out photos crops.
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

from .contract import (
    IRPPlugin,
    IRPResult,
    PluginError,
    error_record,
    finite_or_none,
    os_exit_raises,
    private_copy,
    to_jsonl,
)
from .registry import PLUGIN_FAILURES, PluginRegistry, PluginWarning, describe, get_registry


class TimeBudgetError(RuntimeError):
    """A plugin's run on one input took longer than the ``time_budget``."""


class NonFiniteEnergyError(ValueError):
    """A plugin's result holds a NaN, infinite or missing energy."""


class Orchestrator:
    """Runs ``plugins`` (by name, in order) on inputs, each on its own copy of every input with
    ``step_budget // len(plugins)`` states (at least 1); a failure on an input (docs/irp.md, "When
    a plugin fails") is reported and the plugin tried again on the next."""

    def __init__(self, plugins: Mapping[str, IRPPlugin], step_budget: int,
                 telemetry: IO[str] | None = None, registry: PluginRegistry | None = None,
                 time_budget: float | None = None) -> None:
        if step_budget < 1:
            raise ValueError(f"step_budget must be at least 1, got {step_budget}")
        if time_budget is not None and not 0 < time_budget < math.inf:
            raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget}")
        self.plugins, self.step_budget, self.time_budget = dict(plugins), step_budget, time_budget
        self.telemetry = telemetry
        self.registry = registry or PluginRegistry(load_entry_points=False, builtins=())
        self.errors: list[PluginError] = []
        self.exceptions: list[BaseException] = []

    @classmethod
    def from_registry(cls, configs: Mapping[str, dict[str, Any] | None], step_budget: int,
                      telemetry: IO[str] | None = None, registry: PluginRegistry | None = None,
                      time_budget: float | None = None) -> Orchestrator:
        """Each named plugin created from its config by ``registry`` (default
        :func:`get_registry`); failures are reported and left out, or raised if all failed."""
        registry = registry or get_registry()
        registry.list_plugins()  # runs every module's hook, so failures there are known too
        for error in list(registry.errors):
            if error.stage in ("import", "register"):
                _write(telemetry, error_record(error, "PluginLoadError"))
        plugins: dict[str, IRPPlugin] = {}
        failures: list[tuple[PluginError, BaseException]] = []
        for name, config in configs.items():
            try:
                plugins[name] = registry.create(name, config)
            except PLUGIN_FAILURES as exc:
                source = getattr(registry.list_plugins().get(name), "source", "registry")
                error = registry.report(name, source, describe(exc), stage="factory")
                _write(telemetry, error_record(error, type(exc).__name__))
                failures.append((error, exc))
        if not plugins:
            error, first = failures[0]
            if isinstance(first, Exception):
                raise first
            raise ValueError(f"plugin {error.name!r} could not be created: {error.message}") \
                from first
        orchestrator = cls(plugins, step_budget, telemetry, registry, time_budget)
        orchestrator.errors += [error for error, _ in failures]
        orchestrator.exceptions += [exc for _, exc in failures]
        return orchestrator

    @property
    def steps_per_plugin(self) -> int:
        return max(1, self.step_budget // len(self.plugins))

    def run(self, inputs: Iterable[Any],
            task_ctx: dict[str, Any] | None = None) -> list[dict[str, IRPResult]]:
        """One ``{name: IRPResult}`` per input, without the plugins that failed on it."""
        results = []
        for index, x in enumerate(inputs):
            per_input = {}
            for name, plugin in self.plugins.items():
                try:
                    start = time.perf_counter()
                    with os_exit_raises():
                        result = plugin.run(private_copy(x), task_ctx,
                                            max_steps=self.steps_per_plugin, input_id=index)
                    seconds = time.perf_counter() - start
                    if self.time_budget is not None and seconds > self.time_budget:
                        raise TimeBudgetError(f"took {seconds:.3g} s, over the time budget of "
                                              f"{self.time_budget:g} s")
                    for state in [*result.history, result.state]:
                        if finite_or_none(state.energy_val) is None:
                            raise NonFiniteEnergyError(f"state {state.step_idx} has energy "
                                                       f"{state.energy_val} (not a finite number)")
                    line = to_jsonl(result.telemetry) if self.telemetry is not None else ""
                except PLUGIN_FAILURES as exc:
                    error = self.registry.report(name, type(plugin).__module__, describe(exc),
                                                 stage="run", input_id=index)
                    self.errors.append(error)
                    self.exceptions.append(exc)
                    _write(self.telemetry, error_record(error, type(exc).__name__))
                    continue
                _write(self.telemetry, line)
                per_input[name] = result
            results.append(per_input)
        return results


def _write(stream: IO[str] | None, line: dict[str, Any] | str) -> None:
    if stream is not None:
        stream.write(line if isinstance(line, str) else to_jsonl(line))
        stream.flush()


def setup_args(prog: str = "hrm-vision irp") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="list the plugins and those that failed")
    for flag, meta, text in (("--plugin", "NAME", "plugin to run (repeatable), by registry name"),
                             ("--config", "NAME=JSON", "plugin NAME's config, or NAME=FILE.json")):
        p.add_argument(flag, action="append", default=[], metavar=meta, help=text)
    p.add_argument("--images", nargs="*", default=[], metavar="PATH", help="one input each")
    for flag, default, text in (("--num-crops", 8, "photos crops without --images"),
                                ("--batch-size", 8, "photos crops per input"),
                                ("--step-budget", 10, "states per input, split among plugins")):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="per plugin and input")
    p.add_argument("--telemetry", type=Path, help="JSON-lines file (default: standard output)")
    return p


def _parse_configs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    configs = {}
    for item in items:
        name, _, value = item.partition("=")  # no "=": empty, not valid JSON
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


def refuse_output_over_inputs(output: Path, args: argparse.Namespace,
                              configs: dict[str, dict[str, Any]]) -> None:
    """``ValueError`` if ``output`` is (or links to) an ``--images`` or ``--config`` file or a
    file a plugin config names."""
    if not output.exists():
        return

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    names = [*args.images, *strings(configs)]
    names += [v for _, _, v in (c.partition("=") for c in args.config) if v.endswith(".json")]
    for name in names:
        try:
            same = os.path.samefile(output, name)
        except (OSError, ValueError):
            continue
        if same:
            raise ValueError(f"--telemetry {output} is an input of the run ({name}); it would "
                             "be written over: choose another file")


def _inputs(args: argparse.Namespace) -> list[Any]:
    """Float RGB in [0, 1]: ``(3, H, W)`` per ``--images`` file, else photos crop batches."""
    from ..data import PhotoCrops, read_image
    from .tinyvae import ImageFormat, to_images

    fmt = ImageFormat(multiple_of=1)  # a plugin checks the sizes it needs
    if args.images:
        return [to_images(read_image(p, purpose="reading --images files"), fmt)[0]
                for p in args.images]
    crops = to_images(PhotoCrops("val", num_crops=args.num_crops).images_uint8, fmt)
    return list(crops.split(args.batch_size))


def command(argv: Sequence[str] | None = None, prog: str = "hrm-vision irp") -> int:
    """``hrm-vision irp``: 0 when every plugin ran on every input, 1 when some failed (a
    warning line each); an expected error is raised, for the caller to print in one line."""
    args = setup_args(prog).parse_args(argv)
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
    if unknown := sorted(set(configs) - set(args.plugin)):
        raise ValueError(f"--config given for {unknown}, which are not among --plugin")
    if args.telemetry is not None:
        refuse_output_over_inputs(args.telemetry, args, configs)
    registry = PluginRegistry.for_plugins(args.plugin)
    inputs = _inputs(args)  # before the telemetry file is created: a bad image leaves none
    stream = open(args.telemetry, "w") if args.telemetry else sys.stdout  # noqa: SIM115
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            orch = Orchestrator.from_registry({n: configs.get(n) for n in args.plugin},
                                              args.step_budget, stream, registry,
                                              args.time_budget)
            results = orch.run(inputs, {"channel_order": "rgb"})  # the inputs are RGB
    finally:
        if args.telemetry:
            stream.close()
    runs = [(e, x) for e, x in zip(orch.errors, orch.exceptions, strict=True) if e.stage == "run"]
    # every run failed on what the user can fix (the command line's one-line errors): say so
    if not any(results) and runs and all(isinstance(x, (ValueError, OSError, ImportError))
                                         for _, x in runs):
        error, exc = runs[0]
        label = (args.images[int(error.input_id)] if args.images and error.input_id is not None
                 else f"input {error.input_id}")
        more = f" (+{len(runs) - 1} more failed runs)" if len(runs) > 1 else ""
        raise ValueError(f"{label}: plugin {error.name!r} refused it: {describe(exc)}{more}")
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
