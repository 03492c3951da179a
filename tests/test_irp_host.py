"""The IRP host (``hrm_vision.irp.host``): one plugin's failure stays its own (at import,
``SystemExit`` included, in its factory, on an input: the host starts, the others run, telemetry
records the failure); every plugin gets its own copy of an input; a non-finite energy or a run
over the time budget is a failure; the telemetry file is never written over an input or a
checkpoint; bad counts and deep configs are named errors; ``--plugin NAME`` imports only the
entry points it needs."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_irp_contract import ToyConfig, ToyPlugin  # tests/ is on sys.path under pytest
from test_irp_registry import fake_distribution

from hrm_vision import cli
from hrm_vision.irp import ALLOW_ENV, IRPState, PluginRegistry, PluginWarning, hookimpl
from hrm_vision.irp.contract import validate_telemetry
from hrm_vision.irp.host import Orchestrator
from hrm_vision.irp.registry import UnknownPluginError

ROOT = Path(__file__).resolve().parents[1]


class StepFails(ToyPlugin):
    """The toy plugin whose step raises on inputs listed in ``bad`` (``exit``: SystemExit)."""

    bad: dict[float, BaseException] = {}

    def step(self, state: IRPState) -> IRPState:
        problem = self.bad.get(state.meta["x0"])
        if problem is not None:
            raise problem
        return super().step(state)

    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        state = super().init_state(x0, task_ctx)
        state.meta["x0"] = float(x0)
        return state


class RaisesRuntime(StepFails):
    bad = {2.0: RuntimeError("step exploded on 2.0")}


class CallsExit(StepFails):
    bad = {1.0: SystemExit(3)}


class Interrupted(StepFails):
    bad = {1.0: KeyboardInterrupt()}


class BadTelemetry(ToyPlugin):
    def emit_telemetry(self, history: Any, **kw: Any) -> dict[str, Any]:
        record = super().emit_telemetry(history, **kw)
        record["energy_final"] = "low"  # breaks the schema
        return record


def exploding_factory(config: ToyConfig) -> ToyPlugin:
    raise RuntimeError("factory exploded")


def exiting_factory(config: ToyConfig) -> ToyPlugin:
    sys.exit("factory called sys.exit")


class FixturePlugins:
    """Registers the toy plugin and a plugin failing in each way."""

    @hookimpl
    def register_irp_plugins(self, register: Any) -> None:
        register("toy", ToyPlugin, ToyConfig, kind="test")
        register("step_raises", RaisesRuntime, ToyConfig, kind="test")
        register("step_exits", CallsExit, ToyConfig, kind="test")
        register("interrupted", Interrupted, ToyConfig, kind="test")
        register("bad_telemetry", BadTelemetry, ToyConfig, kind="test")
        register("factory_raises", exploding_factory, ToyConfig, kind="test")
        register("factory_exits", exiting_factory, ToyConfig, kind="test")
        register("mutates", Mutates, ToyConfig, kind="test")  # the input-isolation guards
        register("reads", Reads, ToyConfig, kind="test")
        register("nan_energy", NaNEnergy, ToyConfig, kind="test")


@pytest.fixture
def host() -> Any:
    """A host with the fixture plugins, unregistered afterwards."""
    made = PluginRegistry(load_entry_points=False)
    made.register(FixturePlugins(), name="fixtures")
    try:
        yield made
    finally:
        made.unregister("fixtures")


def records(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    for line in lines:
        validate_telemetry(line)
    return lines


class TestOrchestratorIsolation:
    def test_failing_plugins_are_reported_and_the_others_come_back(self, host) -> None:
        log = io.StringIO()
        configs = {name: {"target": 0.0, "rate": 0.5} for name in
                   ("factory_raises", "toy", "step_raises", "factory_exits", "step_exits",
                    "bad_telemetry")}
        with pytest.warns(PluginWarning):
            orch = Orchestrator.from_registry(configs, step_budget=12, telemetry=log, registry=host)
            results = orch.run([1.0, 2.0, 3.0])
        assert set(orch.plugins) == {"toy", "step_raises", "step_exits", "bad_telemetry"}
        # every input still has the toy's result, and each failing plugin its good inputs
        assert [sorted(r) for r in results] == [["step_raises", "toy"],
                                                ["step_exits", "toy"],
                                                ["step_exits", "step_raises", "toy"]]
        assert results[2]["toy"].state.x == pytest.approx(3.0 / 2 ** 2)  # 3 states of 12 / 4
        failures = {(e.name, e.stage, e.input_id): e.message for e in orch.errors}
        assert set(failures) == {("factory_raises", "factory", None),
                                 ("factory_exits", "factory", None),
                                 ("step_raises", "run", 1), ("step_exits", "run", 0),
                                 ("bad_telemetry", "run", 0), ("bad_telemetry", "run", 1),
                                 ("bad_telemetry", "run", 2)}
        assert "RuntimeError: step exploded on 2.0" in failures[("step_raises", "run", 1)]
        assert "SystemExit: 3" in failures[("step_exits", "run", 0)]
        assert "factory called sys.exit" in failures[("factory_exits", "factory", None)]
        assert "energy_final" in failures[("bad_telemetry", "run", 0)]
        assert {(e.name, e.stage) for e in host.errors} >= {
            ("factory_raises", "factory"), ("step_raises", "run"), ("step_exits", "run")}
        lines = records(log)
        errors = [(r["plugin"], r["error"]["stage"], r.get("input_id")) for r in lines
                  if "error" in r]
        assert sorted(errors, key=str) == sorted(failures, key=str)
        # run records (the plugins are ToyPlugin subclasses: all named "toy"), in input order
        assert [r["input_id"] for r in lines if "error" not in r] == [0, 0, 1, 1, 2, 2, 2]

    def test_plugin_without_host_still_isolated(self) -> None:
        plugins = {"toy": ToyPlugin(ToyConfig()), "raises": RaisesRuntime(ToyConfig())}
        orch = Orchestrator(plugins, step_budget=4)
        with pytest.warns(PluginWarning, match="step exploded"):
            results = orch.run([1.0, 2.0])
        assert [sorted(r) for r in results] == [["raises", "toy"], ["toy"]]
        assert [(e.name, e.input_id) for e in orch.errors] == [("raises", 1)]

    def test_keyboard_interrupt_is_not_swallowed(self, host) -> None:
        orch = Orchestrator.from_registry({"toy": {}, "interrupted": {}}, 4, registry=host)
        with pytest.raises(KeyboardInterrupt):
            orch.run([1.0])

    def test_when_no_plugin_can_start_the_first_failure_is_raised(self, host) -> None:
        from hrm_vision.irp import PluginConfigError

        with pytest.warns(PluginWarning), pytest.raises(PluginConfigError, match="rate"):
            Orchestrator.from_registry({"toy": {"rate": 5}, "factory_raises": {}}, 4, registry=host)
        with pytest.warns(PluginWarning), \
                pytest.raises(ValueError, match="could not be created.*sys.exit"):
            Orchestrator.from_registry({"factory_exits": {}}, 4, registry=host)
        with pytest.warns(PluginWarning), pytest.raises(UnknownPluginError, match="'nope'"):
            Orchestrator.from_registry({"nope": {}}, 4, registry=host)


EXITS_AT_IMPORT = "import sys\nsys.exit('plugin refuses to load')\n"
GOOD = """
from hrm_vision.irp import hookimpl
from test_irp_contract import ToyConfig, ToyPlugin

@hookimpl
def register_irp_plugins(register):
    register("toy_ep", ToyPlugin, ToyConfig, kind="test", description="from an entry point")
"""
EXITS_IN_HOOK = """
import sys
from hrm_vision.irp import hookimpl

@hookimpl
def register_irp_plugins(register):
    sys.exit(4)
"""


@pytest.fixture
def exiting_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Entry points ``exits`` (sys.exit at import), ``hook_exits`` (in its hook), ``good``."""
    fake_distribution(tmp_path, {"hrmv_exits": EXITS_AT_IMPORT, "hrmv_good2": GOOD,
                                 "hrmv_hook_exits": EXITS_IN_HOOK},
                      {"exits": "hrmv_exits", "good": "hrmv_good2",
                       "hook_exits": "hrmv_hook_exits"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    for name in ("hrmv_exits", "hrmv_good2", "hrmv_hook_exits"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


class TestImportFailures:
    def test_sys_exit_at_import_or_in_the_hook_is_reported(self, exiting_dist: Path) -> None:
        with pytest.warns(PluginWarning) as caught:
            host = PluginRegistry()
            plugins = host.list_plugins()
        assert {"tinyvae", "toy_ep"} <= set(plugins)
        assert len(caught) == 2 and "plugin refuses to load" in str(caught[0].message)
        errors = {e.name: e for e in host.errors}
        assert "SystemExit: plugin refuses to load" in errors["exits"].message
        assert errors["exits"].stage == "import"
        assert "SystemExit: 4" in errors["hook_exits"].message
        assert errors["hook_exits"].stage == "register"

    def test_builtin_that_exits_at_import(self, exiting_dist: Path) -> None:
        with pytest.warns(PluginWarning, match="SystemExit"):
            host = PluginRegistry(load_entry_points=False,
                           builtins=("hrmv_exits", "hrm_vision.irp.tinyvae"))
        assert set(host.list_plugins()) == {"tinyvae"}
        assert [(e.name, e.source) for e in host.errors] == [("hrmv_exits", "builtin")]

    def test_load_failures_reach_telemetry_and_name_lookups(self, exiting_dist: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            host = PluginRegistry()
            log = io.StringIO()
            Orchestrator.from_registry({"toy_ep": {}}, 2, telemetry=log, registry=host).run([1.0])
        lines = records(log)
        assert [(r["plugin"], r["error"]["stage"]) for r in lines if "error" in r] == [
            ("exits", "import"), ("hook_exits", "register")]
        assert [r["plugin"] for r in lines if "error" not in r] == ["toy"]
        with pytest.raises(UnknownPluginError, match="'exits' \\(it failed to load: import"):
            host.get("exits")

    def test_list_command_survives_a_plugin_that_exits(self, exiting_dist: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(exiting_dist), str(ROOT),
                                                            str(ROOT / "tests")]),
               "OMP_NUM_THREADS": "1"}
        env.pop(ALLOW_ENV, None)
        proc = subprocess.run([sys.executable, "-m", "hrm_vision", "irp", "--list"],
                              capture_output=True, text=True, env=env, cwd=exiting_dist,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tinyvae" in proc.stdout and "toy_ep" in proc.stdout
        assert "FAILED exits" in proc.stdout and "plugin refuses to load" in proc.stdout
        assert "Traceback" not in proc.stderr


class Mutates(ToyPlugin):
    """Adds 100 to its input tensor in place, then refines its mean."""

    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        x0.add_(100.0)
        return IRPState(float(x0.mean()), 0, meta={})


class Reads(ToyPlugin):
    """Refines the mean of its input tensor (what it saw is in the initial energy)."""

    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        return IRPState(float(x0.mean()), 0, meta={})


class NaNEnergy(Reads):
    def energy(self, state: IRPState) -> float:
        return math.nan


def test_a_plugin_changing_its_input_in_place_does_not_change_the_next_ones(host) -> None:
    x = torch.full((1, 3, 4, 4), 0.5)
    orch = Orchestrator.from_registry({"mutates": {}, "reads": {}}, step_budget=4, registry=host)
    (result,) = orch.run([x])
    assert result["mutates"].history[0].x == pytest.approx(100.5)
    assert result["reads"].history[0].x == pytest.approx(0.5)  # not 100.5
    assert torch.equal(x, torch.full((1, 3, 4, 4), 0.5))  # the caller's input as it was


def test_a_nan_energy_is_a_failure_not_a_result(host) -> None:
    log = io.StringIO()
    orch = Orchestrator.from_registry({"nan_energy": {}, "reads": {}}, step_budget=4,
                                      telemetry=log, registry=host)
    with pytest.warns(PluginWarning, match="not a finite number"):
        (result,) = orch.run([torch.zeros(1, 3, 4, 4)])
    assert set(result) == {"reads"}
    assert [e.name for e in orch.errors] == ["nan_energy"]
    kinds = [json.loads(line).get("error", {}).get("type") for line in log.getvalue().split("\n")
             if line]
    assert "NonFiniteEnergyError" in kinds, kinds


def _cli(args: list[str], capsys) -> tuple[int, str]:
    status = cli.main(["irp", *args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("option", ["--batch-size", "--num-crops"])
def test_a_zero_count_is_a_named_error(option, capsys) -> None:
    status, err = _cli(["--plugin", "tinyvae", option, "0"], capsys)
    assert status == 2 and f"{option} must be at least 1, got 0" in err, err


def test_a_deeply_nested_config_file_is_a_named_error(tmp_path, capsys) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    status, err = _cli(["--plugin", "tinyvae", "--config", f"tinyvae={deep}"], capsys)
    assert status == 2 and "JSON nested too deeply" in err and "Traceback" not in err, err


def test_telemetry_over_an_input_image_or_checkpoint_is_refused(tmp_path, capsys) -> None:
    image = tmp_path / "frame.png"
    image.write_bytes(b"not really read")
    ckpt = tmp_path / "tinyvae_best.pth"
    ckpt.write_bytes(b"weights")
    link = tmp_path / "telemetry.jsonl"
    link.symlink_to(ckpt)
    cases = [["--images", str(image), "--telemetry", str(image)],
             ["--config", json.dumps({"checkpoint": str(ckpt)}).join(["tinyvae=", ""]),
              "--telemetry", str(link)]]
    for extra in cases:
        status, err = _cli(["--plugin", "tinyvae", *extra], capsys)
        assert status == 2 and "is an input of the run" in err, err
    assert image.read_bytes() == b"not really read" and ckpt.read_bytes() == b"weights"


def test_only_the_asked_plugins_entry_points_are_imported(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    fake_distribution(tmp_path, {"intruder": f"open({str(marker)!r}, 'w').close()\n"
                                 "from hrm_vision.irp import hookimpl\n"
                                 "@hookimpl\ndef register_irp_plugins(register):\n    pass\n"},
                      {"intruder": "intruder"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        registry = PluginRegistry.for_plugins(["tinyvae"])
    assert "tinyvae" in registry.list_plugins()
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        PluginRegistry.for_plugins(["intruder"])
    assert marker.exists()


class Slow(Reads):
    def step(self, state: IRPState) -> IRPState:
        time.sleep(0.5)
        return super().step(state)


def test_a_plugin_over_its_time_budget_is_a_failure(host) -> None:
    host.register(SlowPlugins(), name="slow_fixture")
    orch = Orchestrator.from_registry({"slow": {}, "reads": {}}, step_budget=4, registry=host,
                                      time_budget=0.25)
    with pytest.warns(PluginWarning, match="over the time budget of 0.25 s"):
        (result,) = orch.run([torch.zeros(1, 3, 4, 4)])
    assert set(result) == {"reads"}
    assert [e.name for e in orch.errors] == ["slow"]
    with pytest.raises(ValueError, match="time_budget"):
        Orchestrator({"reads": host.create("reads", {})}, step_budget=1, time_budget=0.0)


class SlowPlugins:
    @hookimpl
    def register_irp_plugins(self, register: Any) -> None:
        register("slow", Slow, ToyConfig, kind="test")
