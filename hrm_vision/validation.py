"""Pydantic validation errors as one line a user can act on (shared by every config model)."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, known: Iterable[str] | None = None) -> str:
    """Every problem of ``exc``, ``"; "``-separated, each naming its field.

    A bad value reads ``field: message (got value)``; a key the model forbids reads
    ``unknown key 'name'`` followed by the ``known`` keys when they are given.
    """
    known_keys = ", ".join(known) if known is not None else None
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {field!r}"
                         + (f" (known keys: {known_keys})" if known_keys else ""))
        else:
            lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
