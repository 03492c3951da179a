"""IRP telemetry: the JSON schema shipped with the package, validation and JSON-lines output.

A telemetry record is a plain dict of JSON types (see ``telemetry.schema.json`` next to this
file), of one of two kinds:

- a **run record** (:meth:`hrm_vision.irp.base.IRPPlugin.emit_telemetry`): one refinement run,
  its energies, halt reason, time and trust metrics;
- an **error record** (:func:`error_record`), told apart by its ``"error"`` key: a plugin that
  failed at import, while registering, in its factory, or while running on an input.

Floats are always finite: a non-finite value becomes ``None`` (JSON ``null``), so
``json.dumps(record, allow_nan=False)`` never fails.

jsonschema is a core dependency (a host validates every record it writes, on the robot too) but
is imported on the first validation, so ``import hrm_vision.irp`` stays light.
"""

from __future__ import annotations

import json
import math
import time
from functools import cache
from importlib import resources
from typing import IO, Any

#: Version of the record layout, stored under ``"schema_version"`` (2: error records added).
SCHEMA_VERSION = 2
#: Where a plugin can fail, the ``stage`` of an error record.
ERROR_STAGES = ("import", "register", "factory", "run")
SCHEMA_FILE = "telemetry.schema.json"


def finite_or_none(value: float) -> float | None:
    """``float(value)`` when finite, else ``None`` (JSON-safe)."""
    value = float(value)
    return value if math.isfinite(value) else None


@cache
def telemetry_schema() -> dict[str, Any]:
    """The telemetry JSON schema (Draft 2020-12), read from the installed package."""
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator() -> Any:
    """The schema's validator, built (and jsonschema imported) on first use."""
    import jsonschema

    return jsonschema.Draft202012Validator(telemetry_schema())


def validate_telemetry(record: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the offending field if ``record`` breaks the schema.

    Also refuses values that JSON cannot carry (NaN, infinity, non-JSON types).
    """
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"telemetry is not JSON-safe: {exc}") from exc
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<record>"
        raise ValueError(f"telemetry field {where}: {error.message}")


def error_record(plugin: str, stage: str, error_type: str, message: str, *,
                 source: str | None = None, input_id: str | int | None = None,
                 timestamp: float | None = None) -> dict[str, Any]:
    """The error record of a plugin that failed at ``stage`` (one of :data:`ERROR_STAGES`).

    ``error_type`` is the exception's class name, ``message`` one line of what went wrong.
    """
    if stage not in ERROR_STAGES:
        raise ValueError(f"stage must be one of {ERROR_STAGES}, got {stage!r}")
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "plugin": plugin,
        "error": {"stage": stage, "type": error_type, "message": " ".join(message.split())},
        "timestamp": time.time() if timestamp is None else timestamp,
    }
    if source is not None:
        record["source"] = source
    if input_id is not None:
        record["input_id"] = input_id
    return record


def to_jsonl(record: dict[str, Any]) -> str:
    """``record`` validated and serialised as one JSON line (with its newline)."""
    validate_telemetry(record)
    return json.dumps(record, allow_nan=False, sort_keys=True) + "\n"


def write_jsonl(record: dict[str, Any], stream: IO[str]) -> None:
    """Validate ``record`` and append it to ``stream`` as one JSON line."""
    stream.write(to_jsonl(record))
    stream.flush()
