"""PSNR against the KL budget (free bits per latent element): the rate-distortion trade-off.

Trains each model alone (``experiments/model_ablation.py``: same data, loss, schedule and EMA)
once per ``--free-bits`` value and writes a JSON per run, then a Markdown table and a plot.

    python experiments/rate_distortion.py --model tinyvae --steps 512 --free-bits 1 2 4 8
    python experiments/rate_distortion.py --plot runs/rd        # table + PNG from the JSONs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import model_ablation


def run(model: str, free_bits: Sequence[float], steps: int, out: Path, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for fb in free_bits:
        path = out / f"{model}_fb{fb:g}.json"
        if path.exists():
            print(f"{path} exists, skipped")
            continue
        model_ablation.main(["--model", model, "--steps", str(steps), "--free-bits", str(fb),
                             "--eval-at", "0", str(steps), "--json", str(path), *extra])


def plot(out: Path) -> str:
    rows = []
    for path in sorted(out.glob("*_fb*.json")):
        data = json.loads(path.read_text())
        last = data["curve"][-1]
        rows.append((data["args"]["model"], data["args"]["free_bits"], last["step"],
                     last.get("ema_psnr", last["psnr"]), last["kl_nats"]))
    rows.sort()
    lines = ["| model | free bits (nats/element) | steps | PSNR (dB) | KL spent (nats/element) |",
             "|---|---|---|---|---|"]
    lines += [f"| {m} | {fb:g} | {s} | {p:.2f} | {kl:.2f} |" for m, fb, s, p, kl in rows]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name in sorted({r[0] for r in rows}):
        pts = [(r[1], r[3]) for r in rows if r[0] == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KL budget (free bits, nats per latent element)")
    ax.set_ylabel("validation PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rate_distortion.png", dpi=120)
    table = "\n".join(lines)
    (out / "rate_distortion.md").write_text(table + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["teacher", "tinyvae"])
    p.add_argument("--free-bits", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("runs/rd"))
    p.add_argument("--plot", type=Path, default=None, help="only tabulate and plot this folder")
    a, extra = p.parse_known_args(argv)
    if a.plot is not None:
        print(plot(a.plot))
        return 0
    if a.model is None:
        p.error("--model is required unless --plot is given")
    run(a.model, a.free_bits, a.steps, a.out, extra)
    print(plot(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
