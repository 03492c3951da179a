"""The ``hrm-vision`` command: one entry point for the package's tools.

::

    hrm-vision distill  [options]   # distil the TinyVAE (python -m hrm_vision.distill)
    hrm-vision evaluate [options]   # teacher vs student (python -m hrm_vision.evaluation)
    hrm-vision export   [options]   # ONNX for the edge (python -m hrm_vision.export)
    hrm-vision irp      [options]   # IRP host loop (python -m hrm_vision.irp.host)
    hrm-vision COMMAND --help       # the options of one command

Each subcommand hands the rest of the command line to the ``main(argv) -> int`` of its module,
the same function the ``python -m`` form and the ``training/`` scripts call. The module is
imported only when its command runs, so ``hrm-vision irp`` works on a core install; a command
whose optional dependencies are missing says which extra to install.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import __version__
from ._extras import MissingExtraError, missing_extra

PROG = "hrm-vision"


class Command(NamedTuple):
    """A subcommand: the module whose ``main(argv) -> int`` runs it, and a one-line summary."""

    module: str
    summary: str
    function: str = "main"


#: Subcommand name -> where its ``main(argv)`` lives.
COMMANDS: dict[str, Command] = {
    "distill": Command("hrm_vision.distill.cli",
                       "train the TinyVAE by distillation from a teacher VAE"),
    "evaluate": Command("hrm_vision.evaluation.__main__",
                        "compare teacher and student: size, speed, quality, latents"),
    "export": Command("hrm_vision.export.__main__",
                      "export the student for deployment (ONNX) and check parity"),
    "irp": Command("hrm_vision.irp.host", "run IRP plugins (the TinyVAE perception plugin)"),
}


def usage() -> str:
    """The top-level help text: every subcommand with its summary."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     show this message and exit",
              "  --version      print the version and exit"]
    return "\n".join(lines)


def load_command(name: str) -> Callable[[list[str] | None], int | None]:
    """Import subcommand ``name``'s module and return its ``main``.

    Raises:
        KeyError: ``name`` is not a subcommand.
        MissingExtraError: the module needs an optional dependency that is not installed.
        ModuleNotFoundError: the module itself is not part of this installation.
    """
    cmd = COMMANDS[name]
    try:
        module = importlib.import_module(cmd.module)
    except MissingExtraError:
        raise
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and missing not in ("hrm_vision", ""):
            raise missing_extra(missing, purpose="this command") from exc
        raise
    return getattr(module, cmd.function)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hrm-vision`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        command = load_command(name)
    except ImportError as exc:
        print(f"{PROG} {name}: {exc}", file=sys.stderr)
        return 1
    status = command(rest)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
