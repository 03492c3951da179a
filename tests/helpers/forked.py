"""Commands run in child processes forked from one interpreter that has already imported torch
(a fresh interpreter per case costs seconds on a busy machine).

:func:`run_forked` runs a runner script once and returns the exit statuses it prints.
:func:`command_runner` is the runner for commands: each child runs the command as ``python``
would (``runpy``, ``__main__``) with its own standard streams, optional file size limit (a
write past it fails like a full disk) and exit status; an uncaught exception prints its
traceback and exits 1, as Python does. Its stdin is JSON
``[[argv, path_prefix, stdout_file, stderr_file, fsize], ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]

#: The end of every runner's child loop (after the child's ``try:`` at 8 spaces): an uncaught
#: exception prints its traceback and exits 1, the streams are flushed, the child exits with
#: ``code`` and the parent collects its status; the runner prints the statuses as JSON.
CHILD_EXIT = """
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(statuses))
"""

_COMMAND_RUNNER = """
import json, os, resource, runpy, signal, sys, traceback
{imports}
jobs = json.load(sys.stdin)
statuses = []
for argv, prefix, out, err, fsize in jobs:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.path[:0] = prefix
        if fsize:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails: EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        code = 0
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1]] + argv[2:]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
"""


class Outcome(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def command_runner(imports: str) -> str:
    """The command runner, preloading the modules of the ``imports`` statements."""
    return _COMMAND_RUNNER.format(imports=imports) + CHILD_EXIT


def run_forked(runner: str, jobs: list[list[Any]], cwd: Path, timeout: int = 900,
               drop_env: tuple[str, ...] = (), runners: int = 1) -> list[int]:
    """Run ``runner`` with ``jobs`` on stdin (the package importable, one torch thread, no
    progress bars); returns the exit status of each job (a SIGKILLed child: -9), in order.
    ``runners`` runner processes take alternate jobs at once (two: one per core of a 2-core
    machine, a table in about half the time)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for name in drop_env:
        env.pop(name, None)

    def run(part: list[list[Any]]) -> list[int]:
        if not part:
            return []
        proc = subprocess.run([sys.executable, "-c", runner], input=json.dumps(part),
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    parts = [jobs[i::runners] for i in range(runners)]
    with ThreadPoolExecutor(runners) as pool:
        done = list(pool.map(run, parts))
    statuses = [0] * len(jobs)
    for i, part in enumerate(done):
        statuses[i::runners] = part
    return statuses


def run_commands(runner: str, jobs: list[list[Any]], cwd: Path, timeout: int = 900,
                 drop_env: tuple[str, ...] = (), runners: int = 1) -> list[Outcome]:
    """:func:`run_forked` with :func:`command_runner` jobs; each job's status and streams."""
    statuses = run_forked(runner, jobs, cwd, timeout, drop_env, runners)
    return [Outcome(code, Path(job[2]).read_text(), Path(job[3]).read_text())
            for code, job in zip(statuses, jobs, strict=True)]
