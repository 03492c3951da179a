"""One plugin's failure stays its own: at import (SystemExit included), in its factory, on an
input; the host starts, the orchestrator runs the other plugins, telemetry records the failure."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from test_irp_contract import ToyConfig, ToyPlugin  # tests/ is on sys.path under pytest
from test_irp_plugins import fake_distribution

from hrm_vision.irp import ALLOW_ENV, IRPState, PluginRegistry, PluginWarning, hookimpl
from hrm_vision.irp.host import Orchestrator
from hrm_vision.irp.plugins import UnknownPluginError
from hrm_vision.irp.telemetry import validate_telemetry

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
                           builtins=("hrmv_exits", "hrm_vision.irp.tinyvae_plugin"))
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
        proc = subprocess.run([sys.executable, "-m", "hrm_vision.irp.host", "--list"],
                              capture_output=True, text=True, env=env, cwd=exiting_dist,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tinyvae" in proc.stdout and "toy_ep" in proc.stdout
        assert "FAILED exits" in proc.stdout and "plugin refuses to load" in proc.stdout
        assert "Traceback" not in proc.stderr
