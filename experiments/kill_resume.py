"""Kill a tiny distillation run with SIGKILL at random moments, resume it each time, check it.

    python -m experiments.kill_resume --kills 4 --epochs 8 [--workdir DIR] [--seed 0] [--compare]

See ``tests/helpers/kill_resume.py`` for what each round does and checks. ``--compare`` also
trains the same config without interruption and reports the largest weight difference between
the two final students (0.0 means the resumed run is bit-identical). Exit status 0 when every
check passed; a JSON summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.kill_resume import passed, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.kill_resume",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write (default: a new temporary folder)")
    parser.add_argument("--compare", action="store_true",
                        help="also train without interruption and compare the final weights")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    t0 = time.time()
    summary = run(workdir, args.kills, args.epochs, args.seed, args.compare)
    summary["kills"] = sum("killed_after_s" in r for r in summary["rounds"])
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["passed"] = passed(summary, args.kills)
    for r in summary["rounds"]:
        print(f"round {r['round']}: saved epoch before {r['saved_before']}, resumed from "
              f"{r['resumed_from']} ({'ok' if r['resumed_ok'] else 'WRONG'})"
              + (f", SIGKILL after {r['killed_after_s']} s, saved after {r['saved_after']}"
                 if "killed_after_s" in r else f", exit {r.get('returncode', '-')}"))
    print(json.dumps(summary, default=str))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
