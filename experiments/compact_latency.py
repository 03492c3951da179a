"""Latency of the compact student's encode: one 64x64 crop, one CPU thread, batch 1.

    python experiments/compact_latency.py --repeats 2000
    python experiments/compact_latency.py --arch '{"input_channels": 1}'

Times ``CompactStudentVAE().encode`` in eager PyTorch (``torch.inference_mode``) and the encoder
that ``hrm-vision export`` writes (:func:`hrm_vision.export.export_onnx` of the
encoder graph, fixed crop, dynamic batch) in ONNX Runtime with one intra-op thread, interleaved
round by round so both see the same machine load. Prints the median and 90th percentile in
milliseconds, the ratio of the medians (eager / ONNX Runtime), the encoder's
multiply-accumulates, the date and the machine (CPU, load average). Untrained weights: latency
does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hrm_vision.compact import CompactStudentVAE
from hrm_vision.export import VAEGraph, export_onnx, graph_specs, ort_session
from hrm_vision.timing import machine_info


def onnx_encoder(model: CompactStudentVAE, folder: Path) -> Callable[[object], object]:
    """The exported encoder of ``model`` as an ONNX Runtime session run (one thread)."""
    spec = graph_specs(model, model.image_size)[0]
    path = export_onnx(VAEGraph(model, "encoder"), spec, folder / "encoder.onnx",
                       spec.metadata(model, "untrained"))
    session = ort_session(path, threads=1)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


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
        run_onnx = onnx_encoder(model, Path(tmp))
        feed = x.numpy()
        runners: dict[str, Callable[[], object]] = {"torch": lambda: model.encode(x),
                                                    "onnxruntime": lambda: run_onnx(feed)}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(50):  # warm-up
            for run in runners.values():
                run()
        for _ in range(args.repeats):
            for name, run in runners.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    result: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "arch": model.arch_config(),
        "encode_macs": counter.get_total_flops() // 2, "parameters": model.num_parameters(),
        "repeats": args.repeats}
    for name, ts in times.items():
        ts.sort()
        result[name] = {"median_ms": round(1e3 * statistics.median(ts), 3),
                        "p90_ms": round(1e3 * ts[int(0.9 * len(ts))], 3)}
    result["torch_over_onnxruntime"] = round(
        statistics.median(times["torch"]) / statistics.median(times["onnxruntime"]), 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
