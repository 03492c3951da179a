"""The end of an epoch is committed by ``*_last.pth``: a run SIGKILLed inside or right after any
write of the last epoch (pictures, ``history.json``, the snapshot, the best checkpoint,
``tinyvae_last.pth``) and resumed with ``--resume auto`` ends with exactly the files and weights
of an uninterrupted run, and no temporary file. The same holds for the start of the fine-tuning
phase and its first epoch, which replaces the distillation student in ``tinyvae_best.pth``.

The kill is deterministic: in the child process ``os.replace`` (the last step of every atomic
write) is wrapped to SIGKILL the process at the chosen write, just before the file is put in
place ("inside": its complete temporary file is left behind) or just after. The runs are child
processes forked from one interpreter that has imported torch and the trainer, which keeps the
table fast.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
#: kill], ...]``: ``writes`` is a file that receives the name of every file put in place under
#: the checkpoint folder; ``kill`` is None or ``[name, occurrence, "inside" | "after"]``.
#: stdout: the exit statuses (a SIGKILLed child: -9).
FORK_RUNNER = """
import json, os, signal, sys, traceback
import torch, torchvision, matplotlib, tqdm
from hrm_vision import cli
from hrm_vision.vae import _PatchVAE
# the models keep their data-free DCT start, from which every epoch of these tiny runs improves
# (a data-fitted start is already the linear optimum and would make the first epoch the best)
_PatchVAE.init_from_data = lambda self, images: None
jobs = json.load(sys.stdin)
statuses = []
for argv, log, writes, kill in jobs:
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        replace, seen = os.replace, {}

        def wrapped(src, dst, *args, **kwargs):
            name = os.path.basename(os.fspath(dst))
            seen[name] = seen.get(name, 0) + 1
            with open(writes, "a") as f:
                f.write(name + "\\n")
            due = kill is not None and kill[0] == name and kill[1] == seen[name]
            if due and kill[2] == "inside":
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst, *args, **kwargs)
            if due:
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = wrapped
        try:
            code = cli.main(["distill", *argv])""" + CHILD_EXIT


def run_jobs(jobs: list[list[Any]], cwd: Path) -> list[int]:
    """The jobs' exit statuses, in order; two runner processes take alternate jobs at once (one
    per core of a 2-core CI machine: the table runs in about half the time)."""
    parts = [jobs[0::2], jobs[1::2]]
    with ThreadPoolExecutor(len(parts)) as pool:
        done = list(pool.map(lambda part: run_forked(FORK_RUNNER, part, cwd, timeout=1200)
                             if part else [], parts))
    statuses = [0] * len(jobs)
    statuses[0::2], statuses[1::2] = done
    return statuses


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


def assert_same_run(got: Path, ref: Path) -> None:
    """The same files; checkpoints, history and config equal but for :data:`VARYING`;
    pictures byte for byte."""
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    for name in names:
        if name.endswith(".pth"):
            assert_same(comparable(load_checkpoint(got / name)),
                        comparable(load_checkpoint(ref / name)), name)
        elif name.endswith(".json"):
            assert_same(comparable(json.loads((got / name).read_text())),
                        comparable(json.loads((ref / name).read_text())), name)
        else:
            assert (got / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted run: its checkpoint folder and the files it put in place, in order."""
    work = tmp_path_factory.mktemp("epoch_commit")
    ckpt, writes = work / "reference", work / "reference.writes"
    assert run_jobs([[argv(work, ckpt), str(work / "reference.log"), str(writes), None]],
                    work) == [0], (work / "reference.log").read_text()[-3000:]
    return ckpt, writes.read_text().split()


def kill_points(writes: list[str]) -> list[tuple[str, int, str]]:
    """Every write of the last epoch (after the previous epoch's commit), inside and after."""
    commits = [i for i, name in enumerate(writes) if name == "tinyvae_last.pth"]
    last_epoch = writes[commits[-2] + 1:commits[-1] + 1]
    points = []
    for name in last_epoch:
        occurrence = writes[:commits[-2] + 1 + last_epoch.index(name) + 1].count(name)
        points += [(name, occurrence, "inside"), (name, occurrence, "after")]
    return points


def test_the_last_epoch_writes_every_kind_of_file_and_commits_last(reference) -> None:
    _, writes = reference
    commits = [i for i, name in enumerate(writes) if name == "tinyvae_last.pth"]
    assert len(commits) == EPOCHS
    last_epoch = writes[commits[-2] + 1:commits[-1] + 1]
    assert last_epoch[-1] == "tinyvae_last.pth"
    assert {"history.json", "loss_curves.png", "distill_epoch_002.png",
            "tinyvae_epoch_002.pth", "tinyvae_best.pth"} <= set(last_epoch), last_epoch


def _run_kills(points: list[tuple[str, int, str]], reference: tuple[Path, list[str]],
               work: Path, resuming: str = "distill", **flags: Any) -> None:
    """Kill a run at each of ``points``, resume it, compare with ``reference``; the resumed run
    says ``resuming {resuming} from``."""
    ref, _ = reference
    jobs, resumes = [], []
    for i, (name, occurrence, when) in enumerate(points):
        ckpt = work / f"run{i}"
        jobs.append([argv(ref.parent, ckpt, **flags), str(work / f"run{i}.log"),
                     str(work / f"run{i}.writes"), [name, occurrence, when]])
        resumes.append([argv(ref.parent, ckpt, **flags), str(work / f"resume{i}.log"),
                        str(work / f"resume{i}.writes"), None])
    assert run_jobs(jobs, work) == [-9] * len(points)  # each run died at its write
    for i, (name, _, when) in enumerate(points):
        stray = list((work / f"run{i}").glob(".*.tmp"))
        assert bool(stray) == (when == "inside"), (name, when, stray)
    statuses = run_jobs(resumes, work)
    for i, point in enumerate(points):
        log = (work / f"resume{i}.log").read_text()
        assert statuses[i] == 0, (point, log[-3000:])
        assert f"resuming {resuming} from" in log, (point, log[-2000:])
        assert_same_run(work / f"run{i}", ref)


def test_killed_inside_the_best_checkpoint_of_the_final_epoch(reference, tmp_path: Path) -> None:
    """Killed while the final epoch's ``tinyvae_best.pth`` was being put in place (the window
    the old order, ``*_last.pth`` first, never repaired): the resumed run trains the final epoch
    again and ends as the uninterrupted one."""
    _run_kills([p for p in kill_points(reference[1])
                if p[0] == "tinyvae_best.pth" and p[2] == "inside"], reference, tmp_path)


@pytest.mark.slow
def test_killed_inside_or_after_any_write_of_the_last_epoch(reference, tmp_path: Path) -> None:
    _run_kills(kill_points(reference[1]), reference, tmp_path)


@pytest.fixture(scope="module")
def finetune_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted distillation + fine-tuning run (:data:`FINETUNE`): its checkpoint
    folder and the files it put in place, in order."""
    work = tmp_path_factory.mktemp("finetune_commit")
    ckpt, writes = work / "reference", work / "reference.writes"
    assert run_jobs([[argv(work, ckpt, **FINETUNE), str(work / "reference.log"), str(writes),
                      None]], work) == [0], (work / "reference.log").read_text()[-3000:]
    return ckpt, writes.read_text().split()


def finetune_kill_points(writes: list[str]) -> list[tuple[str, int, str]]:
    """The start commit of the fine-tuning phase and every write of its first epoch, inside
    and after."""
    start = writes.index("tinyvae_finetune_last.pth")
    first_epoch = writes[start:writes.index("tinyvae_finetune_last.pth", start + 1) + 1]
    points = []
    for offset, name in enumerate(first_epoch):
        occurrence = writes[:start + offset + 1].count(name)
        points += [(name, occurrence, "inside"), (name, occurrence, "after")]
    return points


def test_the_first_finetune_epoch_replaces_the_distilled_best(finetune_reference) -> None:
    """The setup the kill tests below rely on: the fine-tuning phase commits its start, then its
    first epoch beats the distillation epoch and replaces ``tinyvae_best.pth`` before its
    commit; the second does not beat it."""
    ref, writes = finetune_reference
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


def test_killed_at_the_finetune_best_checkpoint(finetune_reference, tmp_path: Path) -> None:
    """Killed while or after the first fine-tuning epoch put its student in
    ``tinyvae_best.pth``, before that epoch's commit: the resumed run continues from the
    fine-tuning start (never from the replaced best file) and ends as the uninterrupted one."""
    assert finetune_reference[1].count("tinyvae_best.pth") == 2  # distillation, finetune 1
    points = [("tinyvae_best.pth", 2, "inside"), ("tinyvae_best.pth", 2, "after")]
    _run_kills(points, finetune_reference, tmp_path, resuming="finetune", **FINETUNE)


@pytest.mark.slow
def test_killed_inside_or_after_any_write_of_the_finetune_start(finetune_reference,
                                                                  tmp_path: Path) -> None:
    points = finetune_kill_points(finetune_reference[1])
    inside_start = [("tinyvae_finetune_last.pth", 1, "inside")]  # resumes the distillation
    for sub in ("start", "epoch"):
        (tmp_path / sub).mkdir()
    _run_kills(inside_start, finetune_reference, tmp_path / "start", **FINETUNE)
    _run_kills([p for p in points if p not in inside_start], finetune_reference,
               tmp_path / "epoch", resuming="finetune", **FINETUNE)
