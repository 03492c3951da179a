"""The compact student alone from its PCA start under other learning rates and batch sizes: the
learning benchmark's compact settings (``benchmarks/learn.json``), streamed corpus crops, ten
validations per run; prints each run's held-out and unseen PSNR per validation.

    python experiments/lr_batch.py OUT '{"b64_lr1e-3": {"steps": 1000},
        "b64_lr3e-3": {"steps": 1000, "over": {"learning_rate": 0.003}},
        "b16_lr1e-3": {"steps": 2800, "over": {"batch_size": 16}}}'

Each run ``NAME`` is ``{"steps": N, "over": {config key: value}}`` and writes ``OUT/NAME`` (a
checkpoint folder) and a line of ``OUT/results.jsonl``. Needs the corpus of ``make learn``.
``over`` with ``teacher_epochs`` N, ``epochs`` 0 and the distillation weights runs the compact
teacher instead (its curve is then the teacher's).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from hrm_vision.train import Distiller, load_config

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path, variants: dict) -> None:
    torch.set_num_threads(2)
    learn = json.loads((ROOT / "benchmarks/learn.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for name, v in variants.items():
        steps, over = v["steps"], v.get("over", {})
        batch = over.get("batch_size", learn["compact"].get("batch_size", 64))
        per_epoch = max(math.ceil(steps / 10), math.ceil(65 / batch))
        values = {**learn["compact"], "dataset": "imagefolder", "data_dir": learn["corpus"],
                  "train_samples": per_epoch * batch, "finetune_epochs": 0,
                  "teacher_epochs": 0, "epochs": math.ceil(steps / per_epoch),
                  "checkpoint_dir": str(out / name), "recon_weight": 0.5,
                  "distill_latent_weight": 0.0, "distill_recon_weight": 0.0, **over}
        start = time.perf_counter()
        files = Distiller(load_config(None, values)).run(resume="auto")
        history = json.loads(Path(files["history"]).read_text())
        curve = [(r["epoch"], round(r["val"]["psnr"], 3), round(r["val"]["unseen_psnr"], 3))
                 for r in history]
        record = {"name": name, "wall_s": time.perf_counter() - start, "curve": curve}
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
