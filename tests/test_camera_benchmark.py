"""``benchmarks/camera.py --quick``: every part of the camera benchmark runs on tiny models and
frames and writes the report the documentation reads (not a measurement)."""

from __future__ import annotations

import json

import pytest
from helpers.scripts import load_script  # tests/ is on sys.path (pytest prepend mode)

pytest.importorskip("cv2", reason="the video extra (opencv-python-headless) is missing")


def test_quick_run_reports_every_variant(tmp_path, capsys) -> None:
    camera = load_script("benchmarks/camera.py", "camera")
    assert camera.main(["--quick", "--out", str(tmp_path / "camera.json")]) == 0
    report = json.loads((tmp_path / "camera.json").read_text())
    assert report["load_average_before"] and report["load_average_after"]
    for row in report["frames"].values():
        for t in (1, 2):
            assert {f"conv3x3_64 t{t}", f"eager fp32 roundtrip t{t}"} <= set(row)
            for p in ("fp32", "fp16", "int8"):
                r = row[f"onnxruntime {p} roundtrip t{t}"]
                assert r["median_ms"] > 0 and r["conv_share"] > 0
    assert list(report["frames"]) == ["48x64", "64x96"]
    assert {f"{p} batch {b} t{t}" for p in ("fp32", "int8") for b in (1, 16)
            for t in (1, 2)} == set(report["compact"])
    assert all(r["crops_per_s"] > 0 for r in report["compact"].values())
    assert report["perceive"]["frames"] == 6 and report["perceive"]["conv_share"] > 0
    assert all(c["passed"] for c in report["cost_check"].values())
    out = capsys.readouterr().out
    assert "int8 / fp32 ONNX Runtime speed, 1 thread(s)" in out and "load average before" in out
