"""The IRP contract without a model: refine loop, halting, trust metrics, telemetry schema."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import pytest
from pydantic import Field

from hrm_vision.irp import IRPConfig, IRPPlugin, IRPState, trust_metrics, validate_telemetry
from hrm_vision.irp.contract import telemetry_schema, to_jsonl


class ToyConfig(IRPConfig):
    """Move a number towards ``target`` by ``rate`` of the gap per step."""

    target: float = 0.0
    rate: float = Field(0.5, gt=0, le=1)


class ToyPlugin(IRPPlugin):
    """Energy ``(x - target)^2``; ``rate=1`` reaches energy 0.0 in one step."""

    name = "toy"
    kind = "test"
    config: ToyConfig

    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        return IRPState(float(x0), 0, meta={"ctx": task_ctx})

    def energy(self, state: IRPState) -> float:
        return (state.x - self.config.target) ** 2

    def step(self, state: IRPState) -> IRPState:
        x = state.x + self.config.rate * (self.config.target - state.x)
        new = IRPState(x, state.step_idx + 1, meta=state.meta)
        new.energy_val = self.energy(new)
        return new


def toy(**kw: Any) -> ToyPlugin:
    return ToyPlugin(ToyConfig(**kw))


class TestRefineLoop:
    def test_max_steps_counts_states_including_the_initial_guess(self) -> None:
        state, history = toy(max_steps=4).refine(8.0)
        assert [s.step_idx for s in history] == [0, 1, 2, 3]
        assert [s.x for s in history] == [8.0, 4.0, 2.0, 1.0]
        assert state is history[-1]

    def test_one_step_returns_the_initial_guess(self) -> None:
        state, history = toy().refine(3.0, max_steps=1)
        assert len(history) == 1 and state.x == 3.0 and state.energy_val == 9.0

    def test_max_steps_argument_overrides_config_and_is_checked(self) -> None:
        _, history = toy(max_steps=50).refine(1.0, max_steps=3)
        assert len(history) == 3
        with pytest.raises(ValueError, match="at least 1"):
            toy().refine(1.0, max_steps=0)

    def test_task_ctx_reaches_init_state_as_a_copy(self) -> None:
        ctx = {"a": 1}
        state, _ = toy().refine(1.0, task_ctx=ctx, max_steps=1)
        assert state.meta["ctx"] == ctx and state.meta["ctx"] is not ctx

    def test_converged_halts_when_energy_stops_falling(self) -> None:
        plugin = toy(rate=1.0, max_steps=100, halt_window=2)
        _, history = plugin.refine(5.0)
        # 25 -> 0 -> 0 -> 0: flat over the last 2 steps.
        assert [s.energy_val for s in history] == [25.0, 0.0, 0.0, 0.0]
        assert plugin.halt_reason(history) == "converged"

    def test_halt_eps_stops_slow_progress_early(self) -> None:
        slow = toy(rate=0.01, max_steps=100, halt_eps=0.0)
        fast_stop = toy(rate=0.01, max_steps=100, halt_eps=0.1)
        assert len(slow.refine(1.0)[1]) == 100
        assert len(fast_stop.refine(1.0)[1]) < 10


class TestTrustMetrics:
    def test_monotone_run(self) -> None:
        t = trust_metrics([4.0, 2.0, 1.0])
        assert t.monotonicity == 1.0
        assert t.energy_change_variance == pytest.approx(0.25)  # diffs -2, -1
        assert t.convergence_rate == pytest.approx((4 - 1) / (4 * 2))

    def test_a_rise_lowers_monotonicity(self) -> None:
        assert trust_metrics([1.0, 2.0, 0.5]).monotonicity == 0.5

    def test_single_state_and_zero_energy_are_neutral(self) -> None:
        assert tuple(trust_metrics([3.0])) == (1.0, 0.0, 0.0)
        assert trust_metrics([0.0, 0.0]).convergence_rate == 0.0


class TestTelemetry:
    def test_schema_ships_in_the_package(self) -> None:
        files = resources.files("hrm_vision.irp")
        assert files.joinpath("telemetry.schema.json").is_file()
        assert telemetry_schema()["title"] == "IRP refinement telemetry"

    def test_energy_zero_is_a_valid_final_energy(self) -> None:
        result = toy(rate=1.0, max_steps=2).run(5.0, input_id="frame-1")
        record = result.telemetry
        validate_telemetry(record)
        assert record["energy_final"] == 0.0 and record["energy_trajectory"] == [25.0, 0.0]
        assert record["steps"] == 1 and record["halt_reason"] == "max_steps"
        assert record["input_id"] == "frame-1" and record["plugin"] == "toy"

    def test_single_state_history_validates(self) -> None:
        plugin = toy()
        state = IRPState(0.0, 0, energy_val=0.0)
        record = plugin.emit_telemetry([state], time_ms=0.0, max_steps=1)
        validate_telemetry(record)
        assert record["steps"] == 0 and record["energy_trajectory"] == [0.0]
        assert record["trust"]["monotonicity"] == 1.0

    def test_non_finite_energy_becomes_null_and_stays_json_safe(self) -> None:
        plugin = toy()
        history = [IRPState(1.0, 0, energy_val=1.0), IRPState(2.0, 1, energy_val=math.nan),
                   IRPState(3.0, 2, energy_val=math.inf)]
        record = plugin.emit_telemetry(history, time_ms=1.5)
        validate_telemetry(record)
        assert record["energy_trajectory"] == [1.0, None, None]
        json.dumps(record, allow_nan=False)

    def test_state_without_energy_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="no energy"):
            toy().emit_telemetry([IRPState(1.0)], time_ms=0.0)

    @pytest.mark.parametrize("field, value, where", [
        ("energy_final", math.nan, "JSON-safe"),
        ("halt_reason", "bored", "halt_reason"),
        ("steps", -1, "steps"),
        ("surprise", 1, "surprise"),
    ])
    def test_schema_rejects_bad_records_naming_the_field(self, field: str, value: Any,
                                                          where: str) -> None:
        record = toy(max_steps=2).run(1.0).telemetry
        record[field] = value
        with pytest.raises(ValueError, match=where):
            validate_telemetry(record)

    def test_missing_field_is_rejected(self) -> None:
        record = toy(max_steps=2).run(1.0).telemetry
        del record["trust"]
        with pytest.raises(ValueError, match="trust"):
            validate_telemetry(record)

    def test_to_jsonl_gives_one_parsable_line(self, tmp_path) -> None:
        path = tmp_path / "t.jsonl"
        with open(path, "w") as f:
            for x in (1.0, 2.0):
                f.write(to_jsonl(toy(max_steps=3).run(x).telemetry))
        lines = path.read_text().splitlines()
        assert len(lines) == 2
        assert [json.loads(ln)["energy_initial"] for ln in lines] == [1.0, 4.0]
