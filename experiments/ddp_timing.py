"""Wall time of the same tiny distillation in one process and under ``torchrun`` with 2 processes.

    python -m experiments.ddp_timing [--images 512] [--epochs 2] [--batch 16] [--repeats 2]

Both runs see the same images for the same epochs with the same global batch (one process:
``--batch``; two processes: ``--batch / 2`` each), so they process the same number of samples
and take the same optimizer steps. The single process runs with 1 and with 2 threads; under
torchrun each process uses 1 (torchrun's default ``OMP_NUM_THREADS=1``). Runs are interleaved
so load from other jobs affects all alike. Reports the whole command's wall time and the training
time of the epochs (``time_s`` in ``history.json``, which excludes start-up, the teacher cache and
validation), medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.tiny_run import SCRIPT, prepare


def timed(cmd: list[str], env: dict[str, str], ckpt: Path) -> tuple[float, float]:
    """(wall seconds of ``cmd``, summed epoch training seconds from its history.json)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    history = json.loads((ckpt / "history.json").read_text())
    return wall, sum(r["time_s"] for r in history if r["phase"] == "distill")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ddp_timing",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch size (even)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--student-base-channels", type=int, default=8,
                        help="student width (32: the real TinyVAE)")
    parser.add_argument("--student-latent-dim", type=int, default=8,
                        help="student latent channels (128: the real TinyVAE)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ddp_timing_"))
    variants = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2),
                ("2 processes, 1 thread each", 2, 1))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    for rep in range(args.repeats):
        for name, nproc, threads in variants:
            ckpt = work / f"ckpt_{nproc}_{threads}_{rep}"
            flags = prepare(work, args.epochs, images=args.images,
                            batch_size=args.batch // nproc, checkpoint_dir=ckpt,
                            student_base_channels=args.student_base_channels,
                            student_latent_dim=args.student_latent_dim)
            env = dict(os.environ)
            if nproc == 1:
                env["OMP_NUM_THREADS"] = str(threads)
                cmd = [sys.executable, str(SCRIPT), *flags]
            else:
                env.pop("OMP_NUM_THREADS", None)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nnodes", "1", "--nproc_per_node", str(nproc), str(SCRIPT), *flags]
            results[name].append(timed(cmd, env, ckpt))
            print(f"{name} run {rep + 1}: wall {results[name][-1][0]:.1f} s, "
                  f"epochs {results[name][-1][1]:.1f} s", flush=True)
    print(f"\n{args.images} images (about 90% in the train split), {args.epochs} epochs, "
          f"global batch {args.batch}, student {args.student_base_channels}/"
          f"{args.student_latent_dim} (base channels/latent), "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| run | wall (s) | training epochs (s) |\n|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.1f} | "
              f"{statistics.median(r[1] for r in rows):.1f} |")
    two = statistics.median(r[1] for r in results[variants[2][0]])
    for name, _, _ in variants[:2]:
        one = statistics.median(r[1] for r in results[name])
        print(f"2 processes vs {name}, training epochs: {two / one:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
