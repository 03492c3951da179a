#!/usr/bin/env python
"""The config-key table of ``docs/training.md`` (``make docs``), generated from
:class:`DistillConfig`.

Every field of the pydantic model becomes one row: JSON key, type, default (as JSON), allowed
values or range, and the field's description. The page holds the table between two marker
comments; ``tests/test_docs.py`` fails when the page and the model disagree (a field added,
removed, retyped, re-defaulted or re-described), and this command rewrites it::

    python training/config_table.py                          # print the table
    python training/config_table.py --write docs/training.md  # update the page
    python training/config_table.py --check docs/training.md  # exit 1 if out of date

Fields whose type is itself a pydantic model are listed key by key, with dotted keys
(``section.key``), as they are nested in the JSON config.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from hrm_vision.train.config import DistillConfig

#: The table sits between these two lines of the page.
START_MARKER = ("<!-- config-keys:start: generated from DistillConfig by "
                "`python training/config_table.py --write docs/training.md` -->")
END_MARKER = "<!-- config-keys:end -->"
HEADER = ("| key | type | default | allowed | meaning |\n"
          "|---|---|---|---|---|")


class ConfigRow(NamedTuple):
    """One documented config key."""

    key: str
    type: str
    default: str
    allowed: str
    meaning: str


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "str" if all(isinstance(a, str) for a in typing.get_args(annotation)) else "literal"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for a in typing.get_args(annotation) for v in _literal_values(a)]
    return []


#: (attribute of a pydantic constraint, how the table writes it)
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "multiple of"))


def _allowed(field: FieldInfo) -> str:
    values = _literal_values(field.annotation)
    if values:
        return ", ".join(f"`{json.dumps(v)}`" for v in values)
    parts = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_rows(model: type[BaseModel] = DistillConfig, prefix: str = "") -> list[ConfigRow]:
    """One :class:`ConfigRow` per key of ``model``, in field order (nested models flattened)."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if _is_model(field.annotation):
            rows.extend(config_rows(field.annotation, prefix=key + "."))
            continue
        meaning = " ".join((field.description or name.replace("_", " ")).split())
        rows.append(ConfigRow(key=f"`{key}`", type=_type_name(field.annotation),
                              default=_default(field), allowed=_allowed(field), meaning=meaning))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(model: type[BaseModel] = DistillConfig) -> str:
    """The Markdown table of every key of ``model`` (no trailing newline)."""
    lines = [HEADER]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in config_rows(model)]
    return "\n".join(lines)


def undescribed_fields(model: type[BaseModel] = DistillConfig, prefix: str = "") -> list[str]:
    """Keys of ``model`` whose field has no ``description`` (their row falls back to the name)."""
    missing = []
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            missing += undescribed_fields(field.annotation, prefix=prefix + name + ".")
        elif not field.description:
            missing.append(prefix + name)
    return missing


def extract_table(page: str) -> str:
    """The text between the markers of ``page``; ``ValueError`` if they are missing."""
    if page.count(START_MARKER) != 1 or page.count(END_MARKER) != 1:
        raise ValueError("the page needs exactly one pair of config-keys marker lines:\n"
                         f"{START_MARKER}\n{END_MARKER}")
    start = page.index(START_MARKER) + len(START_MARKER)
    end = page.index(END_MARKER)
    if end < start:
        raise ValueError("the config-keys end marker comes before the start marker")
    return page[start:end].strip("\n")


def splice_table(page: str, table: str) -> str:
    """``page`` with the text between its markers replaced by ``table``."""
    extract_table(page)  # validates the markers
    head, rest = page.split(START_MARKER)
    _, tail = rest.split(END_MARKER)
    return f"{head}{START_MARKER}\n{table}\n{END_MARKER}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or ``--write`` it into a page, or ``--check`` a page (exit 1 if stale)."""
    parser = argparse.ArgumentParser(prog="python training/config_table.py",
                                     description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="PAGE",
                       help="replace the table between the markers of PAGE")
    group.add_argument("--check", type=Path, metavar="PAGE",
                       help="exit with status 1 if the table of PAGE is out of date")
    args = parser.parse_args(argv)
    table = render_table()
    if args.write is None and args.check is None:
        print(table)
        return 0
    page_path = args.write or args.check
    try:
        page = page_path.read_text(encoding="utf-8")
        current = extract_table(page)
    except (OSError, ValueError) as exc:
        print(f"{page_path}: {exc}", file=sys.stderr)
        return 2
    if args.check is not None:
        if current != table:
            print(f"{page_path}: the config-keys table is out of date; run "
                  f"python training/config_table.py --write {page_path}", file=sys.stderr)
            return 1
        return 0
    if current != table:
        page_path.write_text(splice_table(page, table), encoding="utf-8")
        print(f"updated {page_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
