"""The ``hrm-vision`` command: ``hrm-vision COMMAND [options]`` (``python -m hrm_vision`` too).

Each command's module holds ``command(argv, prog) -> int`` and is imported only when that
command runs, so ``hrm-vision irp`` works on a core install and a missing optional dependency is
one line naming the extra. The ``training/`` scripts run commands through :func:`run` under
their own names. An error the user can fix (:data:`EXPECTED_ERRORS`: ``ValueError``, which
includes ``CheckpointError`` and config errors; ``OSError``; ``ImportError``) is one line
``PROG: error: ...`` and status 2; anything else is a bug and keeps its traceback.
``HRM_VISION_TRACEBACK=1`` shows the traceback of expected failures too.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ._extras import EXTRAS, MissingExtraError, missing_extra
from ._version import __version__

PROG = "hrm-vision"
#: Failures that are the user's to fix (a file, a value, a missing extra): one line, status 2.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
#: Set (to anything but "" or "0") to see the traceback of an expected failure too.
TRACEBACK_ENV = "HRM_VISION_TRACEBACK"
#: Exit status of an expected failure (argparse uses it for usage errors too).
ERROR_STATUS = 2


class Command(NamedTuple):
    """A subcommand: the module whose ``command(argv, prog) -> int`` runs it, and a summary."""

    module: str
    summary: str


#: Subcommand name -> the module that holds its ``command``.
COMMANDS: dict[str, Command] = {
    "distill": Command("hrm_vision.train",
                       "train the TinyVAE by distillation from a teacher VAE"),
    "evaluate": Command("hrm_vision.evaluate",
                        "compare teacher and student: size, speed, quality, latents"),
    "export": Command("hrm_vision.export",
                      "export the student for deployment (ONNX) and check parity"),
    "irp": Command("hrm_vision.irp.host", "run IRP plugins (the TinyVAE perception plugin)"),
    "perceive": Command("hrm_vision.perceive",
                        "encode every frame of a video, camera or folder; latents + telemetry"),
    "trust": Command("hrm_vision.trust", "how far a compact student's codes can be trusted"),
}


def error_message(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's message with its line breaks folded.

    A pydantic ``ValidationError`` reads ``field: problem (got value); unknown key 'name'`` (see
    :func:`hrm_vision.io.describe_validation_error`).
    """
    if type(exc).__module__.startswith("pydantic") and callable(getattr(exc, "errors", None)):
        from .io import describe_validation_error

        return describe_validation_error(exc)  # type: ignore[arg-type]
    if (isinstance(exc, ModuleNotFoundError) and not isinstance(exc, MissingExtraError)
            and (exc.name or "").split(".")[0] in EXTRAS):
        exc = missing_extra(exc.name or "", purpose="this command")
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1 and text == repr(exc.args[0]):
        text = str(exc.args[0])
    return text or type(exc).__name__


def report_error(prog: str, exc: BaseException) -> int:
    """Print ``prog: error: <message>`` on standard error; returns :data:`ERROR_STATUS`."""
    print(f"{prog}: error: {error_message(exc)}", file=sys.stderr)
    return ERROR_STATUS


def show_tracebacks() -> bool:
    """True when :data:`TRACEBACK_ENV` asks for tracebacks of expected failures."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def run_main(prog: str, main: Callable[[list[str] | None], int | None],
             argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` with the package's error path: an :data:`EXPECTED_ERRORS` is one line on
    standard error and status 2; other exceptions propagate with their traceback.

    Returns ``main``'s status (``None`` counts as 0).
    """
    try:
        status = main(None if argv is None else list(argv))
    except EXPECTED_ERRORS as exc:
        if show_tracebacks():
            raise
        return report_error(prog, exc)
    except RuntimeError as exc:
        # torch.save turns a failed write (a full disk) into a RuntimeError raised while the
        # OSError was being handled: the OSError is what the user needs to see
        if isinstance(exc.__context__, OSError) and not show_tracebacks():
            return report_error(prog, exc.__context__)
        raise
    return 0 if status is None else int(status)


def usage() -> str:
    """The top-level help text: every subcommand with its summary."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     show this message and exit",
              "  --version      print the version and exit"]
    return "\n".join(lines)


def load_command(name: str) -> Callable[..., int]:
    """Import subcommand ``name``'s module and return its ``command(argv, prog)``.

    Raises:
        KeyError: ``name`` is not a subcommand.
        MissingExtraError: the module needs an optional dependency that is not installed.
        ModuleNotFoundError: the module itself is not part of this installation.
    """
    try:
        module = importlib.import_module(COMMANDS[name].module)
    except MissingExtraError:
        raise
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and missing not in ("hrm_vision", ""):
            raise missing_extra(missing, purpose="this command") from exc
        raise
    return module.command


def run(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run subcommand ``name`` on ``argv`` (default: ``sys.argv[1:]``) as program ``prog``
    (default ``hrm-vision NAME``), the import of its module included in the error path."""
    prog = prog or f"{PROG} {name}"
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(prog, lambda a: load_command(name)(a, prog=prog), args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hrm-vision`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"{PROG}: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return run(args[0], args[1:])
