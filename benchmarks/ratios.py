"""Print the ratios of a pytest-benchmark JSON file: ``python benchmarks/ratios.py FILE``.

Ratios of medians within each group, oriented so that above 1 favours the student / the
faster runtime / the cache.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

#: (group, slow benchmark name, fast benchmark name, what the ratio means)
RATIOS = [
    ("eager encode b64", "test_eager[teacher-encode]", "test_eager[student-encode]",
     "encode speed-up student/teacher"),
    ("eager decode b64", "test_eager[teacher-decode]", "test_eager[student-decode]",
     "decode speed-up student/teacher"),
    ("student encode+decode b64", "test_student_runtime[pytorch-eager]",
     "test_student_runtime[onnxruntime]", "ONNX Runtime speed-up over eager PyTorch (student)"),
    ("distill step b64", "test_distill_step[without-teacher-cache]",
     "test_distill_step[with-teacher-cache]", "distill step speed-up from the teacher cache"),
]


def medians(path: str) -> dict[str, float]:
    """Median seconds per benchmark name."""
    data = json.loads(open(path).read())
    return {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    med = medians(args.json)
    print(f"{'ratio':55s} {'slow (ms)':>10s} {'fast (ms)':>10s} {'ratio':>7s}")
    for _group, slow, fast, meaning in RATIOS:
        if slow in med and fast in med:
            print(f"{meaning:55s} {1e3 * med[slow]:10.2f} {1e3 * med[fast]:10.2f} "
                  f"{med[slow] / med[fast]:6.2f}x")
        else:
            print(f"{meaning:55s} (not run)")
    enc = [med.get(f"test_eager[{r}-encode]") for r in ("teacher", "student")]
    dec = [med.get(f"test_eager[{r}-decode]") for r in ("teacher", "student")]
    if None not in enc + dec:
        print(f"{'encode+decode speed-up student/teacher (sum of medians)':55s} "
              f"{1e3 * (enc[0] + dec[0]):10.2f} {1e3 * (enc[1] + dec[1]):10.2f} "
              f"{(enc[0] + dec[0]) / (enc[1] + dec[1]):6.2f}x")


if __name__ == "__main__":
    main()
