"""Latency of the compact student's encode: one 64x64 crop, one CPU thread, batch 1.

    python experiments/compact_latency.py --repeats 2000

Times ``CompactStudentVAE().encode`` in eager PyTorch (``torch.inference_mode``) and, when the
export extra is installed, the exported encoder in ONNX Runtime (one intra-op thread),
interleaved round by round so both see the same machine load. Prints the median and the 90th
percentile in milliseconds, and the encoder's multiply-accumulates.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hrm_vision.vae import CompactStudentVAE


class _Encode(torch.nn.Module):
    def __init__(self, vae: CompactStudentVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)


def _onnx_runner(model: CompactStudentVAE, x: torch.Tensor,
                 folder: Path) -> Callable[[], object] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    path = folder / "encoder.onnx"
    torch.onnx.export(_Encode(model).eval(), (x,), dynamo=True, verbose=False).save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--arch", type=json.loads, default={}, help="JSON constructor arguments")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = CompactStudentVAE(**args.arch).eval()
    x = torch.rand(1, model.in_channels, model.image_size, model.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.encode(x)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        runners: dict[str, Callable[[], object]] = {"torch": lambda: model.encode(x)}
        onnx_run = _onnx_runner(model, x, Path(tmp))
        if onnx_run is not None:
            runners["onnxruntime"] = onnx_run
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(50):  # warm-up
            for run in runners.values():
                run()
        for _ in range(args.repeats):
            for name, run in runners.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    result = {"encode_macs": counter.get_total_flops() // 2,
              "parameters": model.num_parameters(), "repeats": args.repeats}
    for name, ts in times.items():
        ts.sort()
        result[name] = {"median_ms": round(1e3 * statistics.median(ts), 3),
                        "p90_ms": round(1e3 * ts[int(0.9 * len(ts))], 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
