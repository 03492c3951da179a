"""The package's shape: dependencies run one way (no circle, no arrow back up, lazy imports
included), commands have one entry point, and the library stays within its size.

The order below is docs/architecture.md's: a module may import only modules listed before it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hrm_vision"

#: Lowest first. ``hrm_vision`` is the package face (``__init__.py``); nothing inside imports it.
ORDER = [
    "_version", "_extras", "patches", "timing", "metrics", "codes",  # depend on nothing of ours
    "vae", "compact", "tiling",                                   # the models
    "io", "data",                                                 # files, datasets
    "train.config", "train.loss", "train.callbacks", "train.trainer", "train",
    "export", "evaluate",
    "irp.contract", "irp.registry", "irp.tinyvae", "irp.sage", "irp.host", "irp",
    "perceive", "trust",
    "hrm_vision", "cli", "__main__",
]
#: The library's size: lines of Python and files (8,000 held the package before the crop stream,
#: the camera pipeline, the trust report with its codes, and the shipped weights: together about
#: 1,030 lines; the students' start in their teacher's coordinates and the adapter fit across
#: photographs about 55 more; the patch models' start at the rate budget about 16, the step's
#: fewer passes over the images 6, the channels-last pixel rearrangement 43, the training crops'
#: own scales 29, the trust report's decoder units 8, wide squares cut from reduced pictures
#: 20, the frozen teacher channels-last 2, the finiteness check by sums 4, the flatness check by
#: integer sums 9, the frozen teacher's validation values kept through a phase 7).
MAX_LINES, MAX_FILES = 9314, 30


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "hrm_vision"


def type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (annotations only, not imports)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere (functions included)."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node.__class__ not in (ast.Import, ast.ImportFrom) or node.lineno in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package and package != "hrm_vision" else []
            base = base[:len(base) - node.level + 1]
            targets = [".".join([*base, node.module] if node.module else base)]
            targets = [f"{targets[0]}.{a.name}".strip(".") for a in node.names] + targets
        elif isinstance(node, ast.ImportFrom):
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            targets = [t.removeprefix("hrm_vision.") for t in targets
                       if t.startswith("hrm_vision")]
        else:
            targets = [a.name.removeprefix("hrm_vision.") for a in node.names
                       if a.name.startswith("hrm_vision")]
        for target in targets:
            target = target or "hrm_vision"
            if target in modules and target != name:
                found.add(target)
                break
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_every_module_has_a_place_in_the_order(graph) -> None:
    assert sorted(graph) == sorted(ORDER)


def test_no_arrow_runs_back_up(graph) -> None:
    rank = {m: i for i, m in enumerate(ORDER)}
    upward = {m: sorted(t for t in targets if rank[t] >= rank[m])
              for m, targets in graph.items()}
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_check_sees_an_arrow_back_up(tmp_path) -> None:
    """``imports_of`` finds a lazy relative import (the check is not vacuous)."""
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "loss.py"
    path.write_text("def f():\n    from ..export import x\n    from . import trainer\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert imports_of(path, {"export", "train.trainer", "train.loss"}) == {
            "export", "train.trainer"}
    finally:
        PACKAGE = saved


def test_one_entry_point() -> None:
    mains = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any(isinstance(n, ast.FunctionDef) and n.name == "main"
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert mains == ["cli.py"]


def test_library_size() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in files)
    assert len(files) <= MAX_FILES
    assert lines <= MAX_LINES, f"hrm_vision/ holds {lines} lines of Python"
