"""Feed the distiller's command line each kind of bad input and show what the user gets.

    python -m experiments.bad_inputs [--workdir DIR]     # prints a Markdown table

The cases and their runner live in ``tests/helpers/bad_inputs.py`` (``tests/test_bad_input.py``
asserts each message); this prints one row per case: the exit status and the line that names the
cause. Exit status 1 when a case did not behave as expected.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.helpers.bad_inputs import CASES, message_line, prepare, run_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bad_inputs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    prepare(base, 2)
    rows, failed = [], 0
    for i, case in enumerate(CASES):
        code, text = run_case(case, base, base / f"case_{i:02d}")
        line = message_line(text, case.expect)
        ok = code == case.code and case.expect in text
        failed += not ok
        shown = line.replace(str(base), "…").replace("|", "\\|")
        rows.append(f"| {case.name} | {code} | `{shown}` |" + ("" if ok else " **UNEXPECTED**"))
    print("| bad input | exit | what the user gets |\n|---|---|---|")
    print("\n".join(rows))
    print(json.dumps({"cases": len(CASES), "unexpected": failed}), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
