"""The end of an epoch is committed by ``*_last.pth``: a run SIGKILLed inside or right after any
write of the last epoch (pictures, ``history.json``, the snapshot, the best checkpoint,
``tinyvae_last.pth``) and resumed with ``--resume auto`` ends with exactly the files and weights
of an uninterrupted run, and no temporary file. The same holds for the start of the fine-tuning
phase and its first epoch, which replaces the distillation student in ``tinyvae_best.pth``.

The kill is deterministic: in the child process ``os.replace`` (the last step of every atomic
write) is wrapped to SIGKILL the process at the chosen write, just before the file is put in
place ("inside": its complete temporary file is left behind) or just after. A SIGKILL leaves the
checkpoint folder as it is at that moment, so the uninterrupted reference runs also copy their
folder inside and right after each write (the *kill state* of that write); the every-write tests
resume a copy of each kill state (one resumed run per write instead of a killed run and a
resumed one), and the real kills below check that a killed run leaves exactly its kill state.
The runs are child processes forked from one interpreter that has imported torch and the
trainer, two such interpreters at once.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from helpers.forked import CHILD_EXIT, run_forked

from hrm_vision.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
#: Keys whose values are wall-clock measurements or the run's own folder: they differ between
#: any two runs and are left out of the comparison.
VARYING = {"time_s", "train_img_per_s", "checkpoint_dir"}

#: Runs the distiller's command line in forked children. stdin: JSON ``[[argv, log, writes,
#: kill, states], ...]``: ``writes`` is a file that receives the name of every file put in place
#: under the checkpoint folder; ``kill`` is None or ``[name, occurrence, "inside" | "after"]``;
#: ``states`` is None or a folder that receives a copy of the checkpoint folder inside and right
#: after each write, ``NAME.OCCURRENCE.inside`` and ``NAME.OCCURRENCE.after``. stdout: the exit
#: statuses (a SIGKILLed child: -9).
FORK_RUNNER = """
import json, os, shutil, signal, sys, traceback
import torch, torchvision, matplotlib, tqdm
from hrm_vision import cli
from hrm_vision.vae import _PatchVAE
# the models keep their data-free DCT start, from which every epoch of these tiny runs improves
# (a data-fitted start is already the linear optimum and would make the first epoch the best)
_PatchVAE.init_from_data = lambda self, images, teacher=None, bits_per_pixel=6.0: None
jobs = json.load(sys.stdin)
statuses = []
for argv, log, writes, kill, states in jobs:
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        replace, seen = os.replace, {}

        def keep(dst, name, when):
            if states is not None:
                target = os.path.join(states, f"{name}.{seen[name]}.{when}")
                shutil.copytree(os.path.dirname(os.fspath(dst)), target, symlinks=True)

        def wrapped(src, dst, *args, **kwargs):
            name = os.path.basename(os.fspath(dst))
            seen[name] = seen.get(name, 0) + 1
            with open(writes, "a") as f:
                f.write(name + "\\n")
            keep(dst, name, "inside")
            due = kill is not None and kill[0] == name and kill[1] == seen[name]
            if due and kill[2] == "inside":
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst, *args, **kwargs)
            keep(dst, name, "after")
            if due:
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = wrapped
        try:
            code = cli.main(["distill", *argv])""" + CHILD_EXIT


def run_jobs(jobs: list[list[Any]], cwd: Path) -> list[int]:
    """The jobs' exit statuses, in order; two runner processes take alternate jobs at once."""
    return run_forked(FORK_RUNNER, jobs, cwd, timeout=1200, runners=2)


def argv(workdir: Path, ckpt: Path, epochs: int = EPOCHS, **flags: Any) -> list[str]:
    """The tiny run, with a learning rate and weight average under which its last epoch is the
    best so far from the DCT start (so it writes a best checkpoint too; checked below)."""
    options = {"warmup_steps": 0, "learning_rate": 3e-3, "ema_decay": 0.5, **flags}
    return [*tiny_run.prepare(workdir, epochs, train_samples=16, checkpoint_dir=ckpt,
                              **options), "--resume", "auto"]


#: One distillation epoch, then two fine-tuning epochs: at this learning rate, without a weight
#: average, the first fine-tuning epoch beats the distillation epoch and the second does not
#: (checked below).
FINETUNE = {"epochs": 1, "finetune_epochs": 2, "learning_rate": 3e-2, "ema_decay": 0,
            "kl_free_bits": 0.3607}  # 2 nats per latent element of the tiny student


def comparable(value: Any) -> Any:
    """``value`` without the :data:`VARYING` keys, tensors kept (compared with torch.equal)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)  # NaN equals NaN here


#: A temporary file of an atomic write: ``.NAME.XXXXXXXX.tmp`` (``tempfile.mkstemp``).
TEMPORARY = re.compile(r"^\.(.+)\.\w{8}\.tmp$")


def assert_same_files(got: Path, ref: Path) -> None:
    """The same files (temporary files named by the file they hold); checkpoints, history and
    config equal but for :data:`VARYING`; pictures byte for byte; the lock file's holder (pid,
    start time) is not compared."""
    def named(folder: Path) -> dict[str, Path]:
        return {TEMPORARY.sub(r".\1.tmp", p.name): p for p in folder.iterdir()}

    files, expected = named(got), named(ref)
    assert sorted(files) == sorted(expected)
    for key, path in files.items():
        temporary = TEMPORARY.match(path.name)
        name = temporary[1] if temporary else path.name
        if name.endswith(".pth"):
            assert_same(comparable(load_checkpoint(path)),
                        comparable(load_checkpoint(expected[key])), key)
        elif name.endswith(".json"):
            assert_same(comparable(json.loads(path.read_text())),
                        comparable(json.loads(expected[key].read_text())), key)
        elif name != ".lock":
            assert path.read_bytes() == expected[key].read_bytes(), key


Point = tuple[str, int, str]  #: a kill point: file name, its occurrence, "inside" | "after"


class Reference(NamedTuple):
    """An uninterrupted run: its checkpoint folder, the files it put in place in order, the
    folder of its kill states (see :data:`FORK_RUNNER`) and its flags."""

    folder: Path
    writes: list[str]
    states: Path
    flags: dict[str, Any]

    def state(self, point: Point) -> Path:
        """The folder of the kill state at ``point``."""
        return self.states / "{}.{}.{}".format(*point)

    def kill_state(self, point: Point) -> Path:
        """:meth:`state`, checked: its temporary file is there exactly when the kill is inside
        the write."""
        name, _, when = point
        state = self.state(point)
        stray = [TEMPORARY.sub(r"\1", p.name) for p in state.glob(".*.tmp")]
        assert stray == ([name] if when == "inside" else []), (point, stray)
        return state


class Resumed(NamedTuple):
    """A resumed run: its exit status, its log and its checkpoint folder."""

    status: int
    log: str
    folder: Path


def kill_points(writes: list[str]) -> list[Point]:
    """Every write of the last epoch (after the previous epoch's commit), inside and after."""
    commits = [i for i, name in enumerate(writes) if name == "tinyvae_last.pth"]
    last_epoch = writes[commits[-2] + 1:commits[-1] + 1]
    points = []
    for name in last_epoch:
        occurrence = writes[:commits[-2] + 1 + last_epoch.index(name) + 1].count(name)
        points += [(name, occurrence, "inside"), (name, occurrence, "after")]
    return points


def finetune_kill_points(writes: list[str]) -> list[Point]:
    """The start commit of the fine-tuning phase and every write of its first epoch, inside
    and after."""
    start = writes.index("tinyvae_finetune_last.pth")
    first_epoch = writes[start:writes.index("tinyvae_finetune_last.pth", start + 1) + 1]
    points = []
    for offset, name in enumerate(first_epoch):
        occurrence = writes[:start + offset + 1].count(name)
        points += [(name, occurrence, "inside"), (name, occurrence, "after")]
    return points


#: The real kills: test -> the reference run whose flags it runs with, and its kill points.
KILLS: dict[str, tuple[str, list[Point]]] = {
    "test_killed_inside_the_best_checkpoint_of_the_final_epoch": (
        "reference", [("tinyvae_best.pth", 2, "inside")]),
    "test_killed_at_the_finetune_best_checkpoint": (
        "finetune", [("tinyvae_best.pth", 2, "inside"), ("tinyvae_best.pth", 2, "after")]),
}
#: The every-write tests: test -> the reference run whose kill states it resumes, and the
#: kill points of its writes.
EVERY_WRITE: dict[str, tuple[str, Callable[[list[str]], list[Point]]]] = {
    "test_killed_inside_or_after_any_write_of_the_last_epoch": ("reference", kill_points),
    "test_killed_inside_or_after_any_write_of_the_finetune_start": (
        "finetune", finetune_kill_points),
}


class Runs(NamedTuple):
    """The uninterrupted runs by name, and each real kill's exit status and checkpoint folder
    by ``(test, point)``."""

    references: dict[str, Reference]
    killed: dict[tuple[str, Point], tuple[int, Path]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """At once: the two uninterrupted runs, ``reference`` (:data:`EPOCHS` distillation epochs)
    and ``finetune`` (:data:`FINETUNE`), with their kill states; and the runs of :data:`KILLS`,
    each killed at its point."""
    work = tmp_path_factory.mktemp("epoch_commit")
    refs = {"reference": {}, "finetune": FINETUNE}
    jobs = []
    for name, flags in refs.items():
        (work / f"{name}.states").mkdir()
        jobs.append([argv(work, work / name, **flags), str(work / f"{name}.log"),
                     str(work / f"{name}.writes"), None, str(work / f"{name}.states")])
    killed = [(test, point) for test, (_, points) in KILLS.items() for point in points]
    for i, (test, point) in enumerate(killed):
        jobs.append([argv(work, work / f"killed{i}", **refs[KILLS[test][0]]),
                     str(work / f"killed{i}.log"), str(work / f"killed{i}.writes"),
                     list(point), None])
    statuses = run_jobs(jobs, work)
    for name, status in zip(refs, statuses, strict=False):
        assert status == 0, (work / f"{name}.log").read_text()[-3000:]
    return Runs({name: Reference(work / name, (work / f"{name}.writes").read_text().split(),
                                 work / f"{name}.states", flags) for name, flags in refs.items()},
                {key: (status, work / f"killed{i}")
                 for i, (key, status) in enumerate(zip(killed, statuses[2:], strict=True))})


@pytest.fixture(scope="module")
def reference(runs: Runs) -> Reference:
    return runs.references["reference"]


@pytest.fixture(scope="module")
def finetune_reference(runs: Runs) -> Reference:
    return runs.references["finetune"]


@pytest.fixture(scope="module")
def resumed(runs: Runs, request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, Point], Resumed]:
    """At once, ``--resume auto`` of every real kill (in its folder, a copy of the folder the
    kill left kept beside it as ``FOLDER.killed``) and, for each :data:`EVERY_WRITE` test this
    run of pytest selects, of a copy of each of its kill states: ``{(test, point): Resumed}``."""
    work = tmp_path_factory.mktemp("resumed")
    selected = {item.name for item in request.session.items if item.module is request.module}
    cases = []  # (test, point, reference, folder)
    for (test, point), (_, folder) in runs.killed.items():
        shutil.copytree(folder, f"{folder}.killed", symlinks=True)
        cases.append((test, point, runs.references[KILLS[test][0]], folder))
    for test, (name, points) in EVERY_WRITE.items():
        ref = runs.references[name]
        for point in points(ref.writes) if test in selected else []:
            cases.append((test, point, ref, work / f"state{len(cases)}"))
            shutil.copytree(ref.state(point), cases[-1][3], symlinks=True)
    jobs = [[argv(ref.folder.parent, folder, **ref.flags), f"{folder}.resume.log",
             f"{folder}.resume.writes", None, None] for _, _, ref, folder in cases]
    statuses = run_jobs(jobs, work)
    return {(test, point): Resumed(status, Path(f"{folder}.resume.log").read_text(), folder)
            for (test, point, _, folder), status in zip(cases, statuses, strict=True)}


def assert_resumed_as(run: Resumed, ref: Reference, phase: str, point: Point) -> None:
    """``run`` ended well, said ``resuming {phase} from`` and left the files of ``ref`` (no
    temporary or lock file: ``ref`` has none)."""
    assert run.status == 0, (point, run.log[-3000:])
    assert f"resuming {phase} from" in run.log, (point, run.log[-2000:])
    assert_same_files(run.folder, ref.folder)


def check_real_kills(test: str, runs: Runs, resumed: dict[tuple[str, Point], Resumed],
                     phase: str) -> None:
    """The runs of ``KILLS[test]`` each died at its write, leaving exactly the reference's kill
    state there; resumed, each says ``resuming {phase} from`` and ends as the reference."""
    name, points = KILLS[test]
    ref = runs.references[name]
    for point in points:
        status, folder = runs.killed[(test, point)]
        assert status == -9, (point, status)  # the run died at its write
        assert_same_files(Path(f"{folder}.killed"), ref.kill_state(point))
        assert_resumed_as(resumed[(test, point)], ref, phase, point)


def check_every_write(test: str, runs: Runs, resumed: dict[tuple[str, Point], Resumed],
                      phase: Callable[[Point], str]) -> None:
    """Each kill state of ``EVERY_WRITE[test]`` (checked: a temporary file exactly when inside
    the write), resumed, says ``resuming {phase(point)} from`` and ends as the reference."""
    name, points = EVERY_WRITE[test]
    ref = runs.references[name]
    for point in points(ref.writes):
        ref.kill_state(point)
        assert_resumed_as(resumed[(test, point)], ref, phase(point), point)


def test_the_last_epoch_writes_every_kind_of_file_and_commits_last(reference) -> None:
    writes = reference.writes
    commits = [i for i, name in enumerate(writes) if name == "tinyvae_last.pth"]
    assert len(commits) == EPOCHS
    last_epoch = writes[commits[-2] + 1:commits[-1] + 1]
    assert last_epoch[-1] == "tinyvae_last.pth"
    assert {"history.json", "loss_curves.png", "distill_epoch_002.png",
            "tinyvae_epoch_002.pth", "tinyvae_best.pth"} <= set(last_epoch), last_epoch


def test_killed_inside_the_best_checkpoint_of_the_final_epoch(runs, resumed) -> None:
    """Killed while the final epoch's ``tinyvae_best.pth`` was being put in place (the window
    the old order, ``*_last.pth`` first, never repaired): the resumed run trains the final epoch
    again and ends as the uninterrupted one."""
    test = "test_killed_inside_the_best_checkpoint_of_the_final_epoch"
    assert set(KILLS[test][1]) <= set(kill_points(runs.references["reference"].writes))
    check_real_kills(test, runs, resumed, "distill")


@pytest.mark.slow
def test_killed_inside_or_after_any_write_of_the_last_epoch(runs, resumed) -> None:
    check_every_write("test_killed_inside_or_after_any_write_of_the_last_epoch", runs, resumed,
                      lambda point: "distill")


def test_the_first_finetune_epoch_replaces_the_distilled_best(finetune_reference) -> None:
    """The setup the kill tests below rely on: the fine-tuning phase commits its start, then its
    first epoch beats the distillation epoch and replaces ``tinyvae_best.pth`` before its
    commit; the second does not beat it."""
    ref, writes = finetune_reference.folder, finetune_reference.writes
    start = writes.index("tinyvae_finetune_last.pth")
    assert writes[start - 1] == "tinyvae_last.pth"  # right after the last distillation commit
    first_epoch = writes[start + 1:writes.index("tinyvae_finetune_last.pth", start + 1) + 1]
    assert "tinyvae_best.pth" in first_epoch and first_epoch[-1] == "tinyvae_finetune_last.pth"
    history = json.loads((ref / "history.json").read_text())
    assert [(r["phase"], r["epoch"], r["is_best"]) for r in history] == [
        ("distill", 1, True), ("finetune", 1, True), ("finetune", 2, False)]
    best = load_checkpoint(ref / "tinyvae_best.pth")
    assert (best["phase"], best["epoch"]) == ("finetune", 1)
    assert best["best_psnr"] == history[1]["val"]["psnr"]
    assert not (ref / "tinyvae_finetune_best.pth").exists()


def test_killed_at_the_finetune_best_checkpoint(runs, resumed) -> None:
    """Killed while or after the first fine-tuning epoch put its student in
    ``tinyvae_best.pth``, before that epoch's commit: the resumed run continues from the
    fine-tuning start (never from the replaced best file) and ends as the uninterrupted one."""
    assert runs.references["finetune"].writes.count("tinyvae_best.pth") == 2  # distill, ft 1
    check_real_kills("test_killed_at_the_finetune_best_checkpoint", runs, resumed, "finetune")


@pytest.mark.slow
def test_killed_inside_or_after_any_write_of_the_finetune_start(runs, resumed) -> None:
    # killed inside the start commit, the run resumes the distillation
    check_every_write("test_killed_inside_or_after_any_write_of_the_finetune_start", runs,
                      resumed, lambda point: "distill" if point == (
                          "tinyvae_finetune_last.pth", 1, "inside") else "finetune")
