"""Run a Python script and record every file it writes under a folder (audit hooks).

    python tests/helpers/audit_writes.py --under CKPT_DIR --log-dir LOGS SCRIPT [ARGS...]
    torchrun --nproc_per_node 2 tests/helpers/audit_writes.py --under ckpt --log-dir logs \\
        training/distill_tinyvae.py ...

Each process appends the paths it opened for writing, created (``tempfile.mkstemp``) or renamed
into place (``os.replace``/``os.rename``) under ``--under`` to ``LOG_DIR/rank{RANK}.json``
(``RANK`` from torchrun, 0 otherwise) when it exits. Used to check that only rank 0 writes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    """Install the audit hook, then run ``SCRIPT`` as ``__main__``; returns 0 when it returns."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--under", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    under = str(ns.under.resolve())
    written: set[str] = set()

    def inside(path: Any) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        full = os.path.abspath(os.fsdecode(path))
        return full if full.startswith(under) else None

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args:
            mode, flags = (args[1] or ""), (args[2] if len(args) > 2 else 0) or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            path = inside(args[0]) if writing else None
        elif event in ("os.rename", "tempfile.mkstemp") and args:
            path = inside(args[1] if event == "os.rename" else args[0])
        else:
            return
        if path:
            written.add(path)

    def dump() -> None:
        ns.log_dir.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        (ns.log_dir / f"rank{rank}.json").write_text(json.dumps(sorted(written)))

    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = [ns.script, *ns.args]
    runpy.run_path(ns.script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
