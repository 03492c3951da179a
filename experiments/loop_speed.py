"""Steps per second of the trainer's loop (not one step alone) for one of ``make learn``'s runs
on streamed corpus crops, by torch threads, DataLoader workers and OpenMP's wait policy.

    python experiments/loop_speed.py OUT --rounds 2
    python experiments/loop_speed.py OUT --run distilled --steps 534 \
        --teacher checkpoints/learn/teacher/teacher.pth \
        --variants threads2_workers1,threads1_workers1

``--run`` (``alone`` by default; ``teacher``, ``distilled``, ``spatial``) takes that run's
config from ``benchmarks/learn.py`` (``benchmarks/learn.json``: batch 64, the compact runs in
bf16 and channels-last at scales 0.125-0.5), the distilled student from the compact teacher
``--teacher``. Each variant is a fresh process (its ``OMP_WAIT_POLICY`` must be set before torch
loads) training two epochs of ``--steps`` steps (100) from the PCA start; the figure is the
second epoch's steps/s (the epoch's ``time_s``: steps only, no validation). The variants run in
a rotating order over ``--rounds`` rounds, so that a change of load hits them alike.
``benchmarks/train_step.py`` times the step alone: on a quiet 2-core machine 27-32 ms (over 30
steps/s), while ``make learn``'s alone student trains at 7-12 steps/s. A worker is started
afresh each epoch (it copies the dataset as the epoch left it), which short epochs pay for
more than ``make learn``'s 534-step ones. Writes ``OUT/loop_speed.json``. Needs the corpus of
``make learn``.

Measured 2026-12-07 with ``--rounds 2`` then ``--rounds 3`` (2-core AMD EPYC VM, nothing else
running, load 0.7-2.1; ``experiments/results/loop_speed.json``), the alone student at 100-step
epochs, steps/s of the five rounds:

| variant | steps/s | median |
|---|---|---|
| 2 threads, 1 worker | 7.27, 9.89, 10.12, 11.86, 7.98 | 9.89 |
| 2 threads, no worker | 9.88, 13.66, 11.73, 10.71, 12.30 | 11.73 |
| 1 thread, 1 worker | 13.81, 11.92, 12.60, 9.88, 12.37 | 12.37 |
| 2 threads, 1 worker, ``OMP_WAIT_POLICY=passive`` | 11.20, 11.03, 7.92, 9.96, 10.10 | 10.10 |

The rounds spread by up to 1.5x: 100 steps are too few to rank them. Of the loop's own cost, per
step of the student (2 threads, load 0.5): the last-good copy 0.8 ms, the finiteness check of
every tensor 5.4 ms (0.8 since it sums each tensor), the weight average 0.6 ms; the rest (the
loss bookkeeping, the worker's share of the cores) is not measured apart.

Each run at ``make learn``'s epoch length, two rounds, 2026-12-08, nothing else running
(``experiments/results/loop_speed_534.json`` for the alone student,
``experiments/results/loop_speed_runs.json`` for the others), steps/s:

| run (steps per epoch, load) | 2 threads, worker | 1 thread, worker | 2, none | 1, none |
|---|---|---|---|---|
| alone (534, 1.6-2.3) | 7.12, 7.43 | 9.57, 9.73 | | |
| distilled (534, 1.4-2.5) | 5.30, 5.10 | 4.77, 5.30 | | |
| teacher (67, 0.9-1.6) | 4.00, 3.85 | 3.59, 3.58 | 4.72, 4.03 | 3.40, 3.17 |
| spatial (100, 1.5-1.7) | 6.26, 5.44 | 5.11, 4.61 | 6.82, 6.51 | |

Only the alone student trains faster on one torch thread (1.31-1.34x): its model is cheap
enough that two threads and a crop worker oversubscribe two cores. The distilled student (which
also runs the teacher's encoder) and the teacher gain nothing or lose on one thread, so
``benchmarks/learn.json`` sets one thread for the alone run only (``run_threads``). Without a
worker the teacher and spatial runs here are as fast or faster, but in full ``make learn`` runs
the worker made no difference to the compact runs and sped the spatial student 1.8x (11.97
against 6.50 steps/s, two runs not interleaved, ``docs/results.md``): the 100-step epochs here
restart the worker ten times as often, and ``make learn`` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("teacher", "distilled", "alone", "spatial")
#: name -> (torch threads, DataLoader workers, OMP_WAIT_POLICY or None)
VARIANTS = {
    "threads2_workers1": (2, 1, None),  # make learn's
    "threads2_workers0": (2, 0, None),
    "threads1_workers1": (1, 1, None),
    "threads1_workers0": (1, 0, None),
    "threads2_workers1_passive": (2, 1, "passive"),
}


def child(run: str, threads: int, workers: int, out: Path, teacher: str | None,
          steps: int) -> None:
    """One variant: ``run`` of ``make learn`` (its config from ``benchmarks/learn.py``'s
    :func:`run_configs`) for two epochs of ``steps`` steps from its PCA start, the distilled
    student from ``teacher``; print the second epoch's steps/s as JSON."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learn import learn_config, run_configs  # type: ignore[import-not-found]

    from hrm_vision.train import Distiller, load_config

    torch.set_num_threads(threads)
    cfg = learn_config(str(ROOT / "benchmarks/learn.json"))
    config = run_configs(cfg, 1.0, ROOT / cfg.corpus, out)[run]
    phase = "teacher" if run == "teacher" else "distill"
    epochs = {"teacher_epochs": 2, "epochs": 0} if phase == "teacher" else {"epochs": 2}
    config = load_config(None, {
        **config.model_dump(), **epochs, "num_workers": workers, "val_samples": 64,
        "train_samples": steps * config.batch_size,
        **({"teacher_checkpoint": teacher} if run == "distilled" else {})})
    d = Distiller(config, console=False)
    d.run()
    second = [r for r in d.history if r["phase"] == phase][-1]
    print(json.dumps({"steps_per_s": steps / second["time_s"]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--run", choices=RUNS, default="alone", help="which of make learn's runs")
    p.add_argument("--teacher", help="the compact teacher checkpoint of --run distilled")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--child", nargs=3, metavar=("THREADS", "WORKERS", "DIR"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.run, int(args.child[0]), int(args.child[1]), Path(args.child[2]),
              args.teacher, args.steps)
        return 0
    if (args.run == "distilled") != bool(args.teacher):
        p.error("--teacher goes with --run distilled, and only with it")
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            threads, workers, policy = VARIANTS[name]
            env = {**os.environ, **({"OMP_WAIT_POLICY": policy} if policy else {})}
            done = subprocess.run(
                [sys.executable, __file__, str(args.out), "--child", str(threads), str(workers),
                 str(args.out / f"{name}_{r}"), "--steps", str(args.steps), "--run", args.run,
                 *(["--teacher", str(Path(args.teacher).resolve())] if args.teacher else [])],
                env=env, check=True, capture_output=True,
                text=True, cwd=ROOT)
            value = json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]
            results[name].append(value)
            print(f"round {r + 1} {name}: {value:.2f} steps/s", flush=True)
        loads.append(os.getloadavg()[0])
    summary = {"run": args.run, "steps_per_epoch": args.steps,
               "load_average": loads, "steps_per_s": results}
    (args.out / "loop_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, values in results.items():
        print(f"{name}: {', '.join(f'{v:.2f}' for v in values)} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
