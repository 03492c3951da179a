"""The IRP host keeps plugins and runs apart: every plugin gets its own copy of an input, a
non-finite energy is a failure, the telemetry file is never written over an input or a
checkpoint, bad counts and deep configs are named errors, and ``--plugin NAME`` imports only the
entry points it needs."""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from typing import Any

import pytest
import torch
from test_irp_contract import ToyConfig, ToyPlugin  # tests/ is on sys.path under pytest
from test_irp_plugins import fake_distribution

from hrm_vision.irp import ALLOW_ENV, IRPState, PluginRegistry, PluginWarning, hookimpl
from hrm_vision.irp import host as irp_host
from hrm_vision.irp.host import Orchestrator


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


class Plugins:
    @hookimpl
    def register_irp_plugins(self, register: Any) -> None:
        register("mutates", Mutates, ToyConfig, kind="test")
        register("reads", Reads, ToyConfig, kind="test")
        register("nan_energy", NaNEnergy, ToyConfig, kind="test")


@pytest.fixture
def host() -> PluginRegistry:
    made = PluginRegistry(load_entry_points=False)
    made.register(Plugins(), name="guard_fixtures")
    return made


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
    status = irp_host.main(args)
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
        registry = irp_host._registry_for(["tinyvae"])
    assert "tinyvae" in registry.list_plugins()
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        irp_host._registry_for(["intruder"])
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
