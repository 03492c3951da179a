"""The evaluation report: metric table (Markdown), ratios and the figure (PNG).

Ratios are oriented so that above 1 means the student does better: teacher/student for costs
(parameters, file size, MACs, latency), student/teacher for throughput and quality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor

from .speed import OPS, camera_lines


@dataclass(frozen=True)
class Metric:
    """One row of the table: JSON key, label, whether higher is better, value formatter."""

    key: str
    label: str
    higher_is_better: bool
    fmt: Callable[[float], str]


def _int(v: float) -> str:
    return f"{int(v):,}"


def _mb(v: float) -> str:
    return f"{v / 1e6:.2f} MB"


def _mega(v: float) -> str:
    return f"{v / 1e6:.1f} M"


def _ms(v: float) -> str:
    return f"{v:.2f} ms"


def _ips(v: float) -> str:
    return f"{v:,.0f} img/s"


def _f(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def metrics(throughput_batch: int) -> list[Metric]:
    """Rows shared by teacher and student, in table order."""
    rows = [Metric("parameters", "parameters", False, _int),
            Metric("weights_fp32_bytes", "weights file, fp32 state dict", False, _mb),
            Metric("weights_fp16_bytes", "weights file, fp16 state dict", False, _mb)]
    rows += [Metric(f"macs_{op}", f"MACs per image, {op}", False, _mega) for op in OPS]
    for op in OPS:
        rows += [Metric(f"latency_{op}_median_ms", f"CPU latency batch 1, {op}, median",
                        False, _ms),
                 Metric(f"latency_{op}_p90_ms", f"CPU latency batch 1, {op}, p90", False, _ms)]
    rows += [Metric(f"throughput_{op}_ips", f"CPU throughput batch {throughput_batch}, {op}",
                    True, _ips) for op in OPS]
    rows += [Metric("psnr_db", "PSNR (dB)", True, _f(2)), Metric("ssim", "SSIM", True, _f(4))]
    return rows


def ratios(teacher: dict[str, float], student: dict[str, float],
           rows: list[Metric]) -> dict[str, float]:
    """Student advantage per metric: student/teacher if higher is better, else teacher/student."""
    return {m.key: (student[m.key] / teacher[m.key] if m.higher_is_better
                    else teacher[m.key] / student[m.key]) for m in rows}


def _cross(align: dict[str, Any]) -> str:
    value = align.get("cross_psnr_db")
    return "n/a (no adapter)" if value is None else f"{value:.2f} dB PSNR"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: metric table, latent section, provenance."""
    t, s, r = report["teacher"], report["student"], report["ratios"]
    rows = metrics(report["timing"]["throughput_batch"])
    lines = ["| metric | teacher | student | ratio (student advantage) |", "|---|---|---|---|"]
    lines += [f"| {m.label} | {m.fmt(t[m.key])} | {m.fmt(s[m.key])} | {r[m.key]:.2f}x |"
              for m in rows]
    align, q = report["alignment"], report["latent_uint8"]
    cka = align["cka_adapted"]
    lines += ["", "| latent | value |", "|---|---|",
              f"| linear CKA, adapted student vs teacher | "
              f"{'n/a (no adapter)' if cka is None else f'{cka:.4f}'} |",
              f"| linear CKA, raw student vs teacher | {align['cka_unadapted']:.4f} |",
              f"| teacher decoder on the adapted student latent | {_cross(align)} |",
              f"| student PSNR, float32 latent | {q['psnr_float_db']:.2f} dB |",
              f"| student PSNR, uint8 latent | {q['psnr_uint8_db']:.2f} dB "
              f"(cost {q['psnr_cost_db']:.2g} dB) |",
              f"| student SSIM, uint8 latent | {q['ssim_uint8']:.4f} |",
              f"| latent bytes per image, float32 / uint8 | "
              f"{q['bytes_float32']:,} / {q['bytes_uint8']:,} |",
              "", f"uint8 scheme: {q['scheme']}."]
    lines += _reconstruction_lines(report)
    lines += _rate_lines(report.get("rate", []))
    lines += _frame_lines(report.get("frames"))
    if "camera" in report:  # the student at camera resolution (speed.camera_speed)
        lines += ["", *camera_lines(report["camera"], report["timing"]["threads"])]
    d, tm, mach = report["dataset"], report["timing"], report["machine"]
    lines += ["", "Ratios: teacher/student for costs, student/teacher for throughput and "
              "quality; above 1 means the student does better.",
              f"Quality on {d['num_images']} images of `{d['name']}` ({d['split']} split, "
              f"{d['image_size']}x{d['image_size']}). Timing: {tm['threads']} threads, "
              f"{tm['latency_repeats']} rounds at batch 1, {tm['throughput_repeats']} at batch "
              f"{tm['throughput_batch']}, both models interleaved in one process, medians.",
              f"Machine: {mach['cpu']} ({mach['cpu_count']} logical CPUs, load average "
              f"{mach.get('load_average_1_5_15min')} at the start), torch "
              f"{mach['torch']}, {report['date_utc']}.",
              f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def _reconstruction_lines(report: dict[str, Any]) -> list[str]:
    """Both models and the baselines on the same images: numbers kept per image, PSNR."""
    rows = report.get("reconstructions", [])
    if not rows:
        return []
    lines = ["", "| reconstruction (same images) | numbers kept per image | PSNR (dB) |",
             "|---|---|---|"]
    return lines + [f"| {r['name']} | {r['numbers']:,} | {r['psnr_db']:.2f} |" for r in rows]


def _rate_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Rate and both qualities per model and set, with the Gaussian references at that rate."""
    if not rows:
        return []
    lines = ["", "| rate (same images) | images | KL nats per latent element | bits per pixel | "
             "decode(mu) PSNR | decode(z) PSNR | water-filling bound at that rate | "
             "uniform allocation at that rate |", "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['model']} | {r['images']} | {r['kl_nats_per_element']:.3f} | "
                    f"{r['bits_per_pixel']:.2f} | {r['psnr_mu_db']:.2f} dB | "
                    f"{r['psnr_sample_db']:.2f} dB | {r['water_filling_psnr_db']:.2f} dB | "
                    f"{r['uniform_psnr_db']:.2f} dB |" for r in rows]


def _frame_lines(frames: dict[str, Any] | None) -> list[str]:
    """The held-out photographs at full resolution: reconstructions and rate."""
    if not frames:
        return []
    sizes = ", ".join(f"{p['name']} {p['height']}x{p['width']}" for p in frames["photos"])
    lines = ["", f"Held-out photographs at full resolution ({sizes}), PSNR pooled over every "
             "pixel:", "", "| reconstruction (full frames) | numbers per 8x8 patch | PSNR (dB) |",
             "|---|---|---|"]
    lines += [f"| {r['name']} | {r['numbers']:,} | {r['psnr_db']:.2f} |"
              for r in frames["reconstructions"]]
    return lines + _rate_lines(frames["rate"])


def _image(t: Tensor) -> Any:
    return t.clamp(0, 1).permute(1, 2, 0).numpy()


def figure_rows(samples: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """``(label, images)`` rows of the figure, each ``(K, 3, S, S)`` in [0, 1]: the inputs, the
    teacher's and the student's reconstructions (those present in ``samples``) and the
    student's error ``|student - input|`` enlarged ten times, so a person sees where it fails."""
    from ..metrics import error_image

    rows = [(n, samples[n]) for n in ("inputs", "teacher", "student") if n in samples]
    if "inputs" in samples and "student" in samples:
        rows.append(("error x10", error_image(samples["student"], samples["inputs"])))
    return rows


def figure(report: dict[str, Any], samples: dict[str, Tensor], path: Path) -> Path:
    """The rows of :func:`figure_rows` (drawn with nearest-neighbour enlargement, labelled) above
    a bar chart of ratios."""
    samples = dict(figure_rows(samples))
    names = list(samples)
    k = samples["inputs"].shape[0] if names else 0
    fig = Figure(figsize=(max(8.0, 1.1 * k), 3.3 + 1.1 * len(names)), layout="constrained")
    grid = fig.add_gridspec(len(names) + 1, max(k, 1),
                            height_ratios=[1.0] * len(names) + [3.0])
    for row, name in enumerate(names):
        for col in range(k):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(_image(samples[name][col]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    r = report["ratios"]
    bars = {"parameters (T/S)": r["parameters"], "fp32 file (T/S)": r["weights_fp32_bytes"],
            "MACs enc+dec (T/S)": r["macs_both"],
            **{f"throughput {op} (S/T)": r[f"throughput_{op}_ips"] for op in OPS},
            "PSNR (S/T)": r["psnr_db"], "SSIM (S/T)": r["ssim"]}
    if report["alignment"]["cka_adapted"] is not None:
        bars["CKA adapted (value)"] = report["alignment"]["cka_adapted"]
    ax = fig.add_subplot(grid[len(names), :])
    labels, values = list(bars), list(bars.values())
    ax.barh(labels, values, color=["tab:blue"] * 6 + ["tab:green"] * (len(values) - 6))
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("ratio (log scale); above 1: the student does better")
    ax.set_title("student vs teacher")
    fig.savefig(path, dpi=110)
    return path
