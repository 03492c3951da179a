"""The reference IRP host loop: registry plugins by name, a step budget, JSON-lines telemetry.

>>> host = Orchestrator.from_registry({"tinyvae": {"checkpoint": "checkpoints/tinyvae_best.pth"}},
...                                   step_budget=10, telemetry=open("telemetry.jsonl", "w"))
>>> results = host.run(frames)       # one {plugin name: IRPResult} per input

Command line::

    python -m hrm_vision.irp.host --list
    python -m hrm_vision.irp.host --plugin tinyvae \\
        --config tinyvae='{"checkpoint": "checkpoints/tinyvae_best.pth"}' \\
        --num-crops 8 --step-budget 10 --telemetry telemetry.jsonl

The step budget is the number of states each input may use, split evenly among the plugins
(each gets at least 1, its initial guess).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._extras import MissingExtraError, require
from .base import IRPPlugin, IRPResult
from .plugins import IRPHost, get_host
from .telemetry import write_jsonl


class Orchestrator:
    """Runs IRP plugins on a stream of inputs under a step budget.

    Args:
        plugins: plugin instances by name, run in this order on every input.
        step_budget: states per input over all plugins (``>= 1``), split evenly.
        telemetry: a text stream receiving one validated JSON line per (input, plugin) run.
    """

    def __init__(self, plugins: Mapping[str, IRPPlugin], step_budget: int,
                 telemetry: IO[str] | None = None) -> None:
        if not plugins:
            raise ValueError("the orchestrator needs at least one plugin")
        if step_budget < 1:
            raise ValueError(f"step_budget must be at least 1, got {step_budget}")
        self.plugins = dict(plugins)
        self.step_budget = step_budget
        self.telemetry = telemetry

    @classmethod
    def from_registry(cls, configs: Mapping[str, dict[str, Any] | None], step_budget: int,
                      telemetry: IO[str] | None = None,
                      host: IRPHost | None = None) -> Orchestrator:
        """Create each named plugin from its plain-dict config through ``host`` (default host)."""
        host = host or get_host()
        return cls({name: host.create(name, cfg) for name, cfg in configs.items()},
                   step_budget, telemetry)

    @property
    def steps_per_plugin(self) -> int:
        """``max_steps`` each plugin gets for one input."""
        return max(1, self.step_budget // len(self.plugins))

    def run(self, inputs: Iterable[Any],
            task_ctx: dict[str, Any] | None = None) -> list[dict[str, IRPResult]]:
        """Run every plugin on every input; returns one ``{name: IRPResult}`` per input."""
        results = []
        for index, x in enumerate(inputs):
            per_input = {}
            for name, plugin in self.plugins.items():
                result = plugin.run(x, task_ctx, max_steps=self.steps_per_plugin,
                                    input_id=index)
                if self.telemetry is not None:
                    write_jsonl(result.telemetry, self.telemetry)
                per_input[name] = result
            results.append(per_input)
        return results


# ---------------------------------------------------------------------- command line
def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hrm_vision.irp.host",
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
    parser.add_argument("--telemetry", type=Path, default=None,
                        help="JSON-lines output file (default: standard output)")
    return parser


def _parse_configs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    configs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config expects NAME=JSON, got {item!r}")
        text = Path(value).read_text() if value.endswith(".json") else value
        try:
            configs[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--config {name}: not valid JSON ({exc})") from exc
    return configs


def _inputs(args: argparse.Namespace) -> list[Any]:
    if args.images:
        image = require("PIL.Image", extra="train", purpose="reading --images files")
        return [np.asarray(image.open(p).convert("RGB")) for p in args.images]
    from ..data.photos import PhotoCrops

    crops = PhotoCrops("val", num_crops=args.num_crops).images_uint8.float() / 255.0
    return list(crops.split(args.batch_size))


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_args().parse_args(argv)
    host = get_host()
    if args.list:
        for name, info in sorted(host.list_plugins().items()):
            print(f"{name:12s} {info.kind:12s} {info.description}  [{info.source}]")
        for err in host.errors:
            print(f"FAILED {err.name} ({err.source}): {err.message}")
        return 0
    if not args.plugin:
        raise SystemExit("give at least one --plugin NAME (see --list)")
    configs = _parse_configs(args.config)
    unknown = sorted(set(configs) - set(args.plugin))
    if unknown:
        raise SystemExit(f"--config given for {unknown}, which are not among --plugin")
    stream = open(args.telemetry, "w") if args.telemetry else sys.stdout  # noqa: SIM115
    try:
        orch = Orchestrator.from_registry({n: configs.get(n) for n in args.plugin},
                                          args.step_budget, stream, host)
        results = orch.run(_inputs(args))
    except (ValueError, KeyError, MissingExtraError) as exc:  # each says what to fix
        raise SystemExit(f"error: {exc}") from exc
    finally:
        if args.telemetry:
            stream.close()
    for name in args.plugin:
        records = [r[name].telemetry for r in results]
        first = np.mean([t["energy_initial"] for t in records if t["energy_initial"] is not None])
        final = np.mean([t["energy_final"] for t in records if t["energy_final"] is not None])
        print(f"{name}: {len(records)} inputs, mean energy {first:.6g} -> {final:.6g}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
