"""Golden run: a short seeded run of all three phases (teacher pre-training, distillation,
fine-tuning) on tiny models must give the same history, the same checkpoints and the same set of
files as the recorded one. Any change to what the trainer computes or saves fails it; a change
that is meant to alter the results regenerates the file deliberately:

    python tests/test_golden_run.py --update

Tolerances. Numbers are compared to a relative 1e-4. A tensor is recorded by the sum and the sum
of absolute values of its elements; float32 kernels differ between x86 CPU vendors in the last
bits, and a sum of elements near zero (a bias of small values of both signs) amplifies that in
relative terms. The recording machine (Intel Xeon) and an AMD EPYC, same torch, differ by at most
1.5e-7 per element in such sums (``adapter.proj.bias``, 16 elements, sum of absolute values
0.0024: 2.3e-6 apart, a relative 1e-3) and by at most 4e-6 relative in any logged number. So a
tensor's sums are compared within ``TENSOR_REL`` of its sum of absolute values plus
``TENSOR_PER_ELEMENT`` per element (7x the largest difference seen), which one training step
taken with a 10% larger learning rate still exceeds (``test_compare_sees_one_perturbed_step``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hrm_vision.train import Distiller, load_config

GOLDEN = Path(__file__).parent / "golden" / "run.json"

#: The run: 24 training and 8 validation crops of the offline photos, one torch thread; both
#: models start at and are held to a rate (bits per pixel) by the KL's multiplier, as make demo.
CONFIG = {"dataset": "photos", "train_samples": 24, "val_samples": 8, "batch_size": 8,
          "kl_target": 0.25,
          "teacher_latent_dim": 16, "teacher_base_channels": 8, "teacher_blocks_per_stage": 1,
          "student_latent_dim": 8, "student_base_channels": 8, "warmup_steps": 2,
          "teacher_epochs": 2, "epochs": 2, "finetune_epochs": 2, "save_interval": 1,
          "log_interval": 1000, "perceptual_backbone": "teacher", "device": "cpu", "seed": 3}

#: History keys that are clock readings, not results.
CLOCK = {"time_s", "train_img_per_s"}
#: Significant digits numbers are recorded with.
DIGITS = 6
#: Relative tolerance of every recorded number.
REL = 1e-4
#: A tensor's sums: within TENSOR_REL of its recorded sum of absolute values...
TENSOR_REL = 1e-4
#: ... plus this much per element (float32 rounding differs between CPU vendors).
TENSOR_PER_ELEMENT = 1e-6


def _number(value: float) -> float | str:
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{DIGITS}g}")


def _plain(value: Any, out_dir: str) -> Any:
    """``value`` with floats rounded, tensors summarised and the run folder renamed."""
    if isinstance(value, torch.Tensor):
        t = value.detach().double()
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                "sum": _number(float(t.sum())), "abs": _number(float(t.abs().sum()))}
    if isinstance(value, dict):
        return {str(k): _plain(v, out_dir) for k, v in value.items()
                if str(k) not in CLOCK}
    if isinstance(value, (list, tuple)):
        return [_plain(v, out_dir) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return value.replace(out_dir, "<run>")
    return repr(value)


def record(out: Path) -> dict[str, Any]:
    """Run the golden config into ``out``; its history, checkpoints and files."""
    torch.set_num_threads(1)
    config = load_config(None, {**CONFIG, "checkpoint_dir": str(out)})
    Distiller(config, console=False).run()
    name = str(out)
    # the rng_state's Python entry is 625 integers: its sum stands for it
    checkpoints = {}
    for path in sorted(out.glob("*.pth")):
        payload = torch.load(path, weights_only=True)
        rng = payload.get("rng_state")
        if isinstance(rng, dict) and "python" in rng:
            version, state, gauss = rng["python"]
            rng["python"] = [version, sum(state) % 2**61, gauss]
        checkpoints[path.name] = _plain(payload, name)
    return {"files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                            if p.is_file()),
            "history": _plain(json.loads((out / "history.json").read_text()), name),
            "checkpoints": checkpoints}


def _compare_tensor(now: dict[str, Any], then: dict[str, Any], where: str) -> list[str]:
    """The differences between two tensor summaries (shape, dtype, sum, abs)."""
    if (now["shape"], now["dtype"]) != (then["shape"], then["dtype"]):
        return [f"{where}: {now['shape']} {now['dtype']} != {then['shape']} {then['dtype']}"]
    tol = TENSOR_REL * float(then["abs"]) + TENSOR_PER_ELEMENT * math.prod(then["shape"])
    return [f"{where}.{key}: {now[key]} != {then[key]} (tolerance {tol:.3g})"
            for key in ("sum", "abs") if not abs(float(now[key]) - float(then[key])) <= tol]


def _compare(now: Any, then: Any, where: str) -> list[str]:
    """Every difference between ``now`` and ``then`` (numbers to a relative ``REL``, tensor
    summaries as :func:`_compare_tensor` says)."""
    if isinstance(then, dict) and isinstance(now, dict):
        if set(now) != set(then):
            return [f"{where}: keys {sorted(set(now) ^ set(then))} differ"]
        if set(then) == {"shape", "dtype", "sum", "abs"}:
            return _compare_tensor(now, then, where)
        return [d for k in then for d in _compare(now[k], then[k], f"{where}.{k}")]
    if isinstance(then, list) and isinstance(now, list):
        if len(now) != len(then):
            return [f"{where}: length {len(now)} != {len(then)}"]
        return [d for i, (a, b) in enumerate(zip(now, then, strict=True))
                for d in _compare(a, b, f"{where}[{i}]")]
    if isinstance(then, float) and isinstance(now, float):
        return [] if now == pytest.approx(then, rel=REL, abs=1e-6) else [
            f"{where}: {now} != {then}"]
    return [] if now == then else [f"{where}: {now!r} != {then!r}"]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    return record(tmp_path_factory.mktemp("golden"))


def test_files_written_match(run, golden) -> None:
    assert run["files"] == golden["files"]


def test_history_matches(run, golden) -> None:
    assert _compare(run["history"], golden["history"], "history") == []


def test_checkpoints_match(run, golden) -> None:
    assert sorted(run["checkpoints"]) == sorted(golden["checkpoints"])
    for name, then in golden["checkpoints"].items():
        assert _compare(run["checkpoints"][name], then, name) == []


def test_compare_sees_one_perturbed_step(golden, tmp_path, monkeypatch) -> None:
    """One optimizer step (the fifth of the run) taken with a 10% larger learning rate is a
    change the comparison reports, in the checkpoints alone and in the history alone."""
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def perturbed(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != 5:
            return step(self, *args, **kwargs)
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] *= 1.1
        try:
            return step(self, *args, **kwargs)
        finally:
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr

    monkeypatch.setattr(torch.optim.AdamW, "step", perturbed)
    changed = record(tmp_path)
    assert calls["n"] > 5
    assert _compare(changed["checkpoints"], golden["checkpoints"], "checkpoints")
    assert _compare(changed["history"], golden["history"], "history")


def test_compare_sees_a_change(golden) -> None:
    """The comparison fails on a changed number (it is not vacuous)."""
    changed = json.loads(json.dumps(golden["history"]))
    changed[-1]["val"]["psnr"] *= 1.001
    assert _compare(changed, golden["history"], "history")


if __name__ == "__main__":
    import tempfile

    if "--update" not in sys.argv[1:]:
        sys.exit("usage: python tests/test_golden_run.py --update")
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(record(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
