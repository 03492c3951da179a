"""IRP telemetry: the JSON schema shipped with the package, validation and JSON-lines output.

A telemetry record is a plain dict of JSON types (see ``telemetry.schema.json`` next to this
file). Floats are always finite: a non-finite value becomes ``None`` (JSON ``null``), so
``json.dumps(record, allow_nan=False)`` never fails.

jsonschema is a core dependency (a host validates every record it writes, on the robot too) but
is imported on the first validation, so ``import hrm_vision.irp`` stays light.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import IO, Any

#: Version of the record layout, stored under ``"schema_version"``.
SCHEMA_VERSION = 1
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


def write_jsonl(record: dict[str, Any], stream: IO[str]) -> None:
    """Validate ``record`` and append it to ``stream`` as one JSON line."""
    validate_telemetry(record)
    stream.write(json.dumps(record, allow_nan=False, sort_keys=True) + "\n")
    stream.flush()
