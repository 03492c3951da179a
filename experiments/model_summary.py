"""The architecture table of the registered models (``docs/models.md``).

    python experiments/model_summary.py --size 32

Parameters, latent shape and multiply-accumulates (:func:`hrm_vision.vae.count_macs`) of every
model at its defaults (:func:`summary_rows`), as a markdown table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import hrm_vision  # noqa: F401 (registers the compact pair)
from hrm_vision.vae import MODELS, count_macs


def summary_rows(size: int = 32) -> list[dict[str, object]]:
    """Parameters, latent shape and MACs of each registered model at its defaults, for a ``size
    x size`` image (a compact model: its own crop size)."""
    rows = []
    for name, cls in MODELS.items():
        model = cls()
        side = getattr(model, "image_size", size)  # a compact model has a fixed crop size
        c, *grid = model.latent_shape(side, side)  # a compact model: (latent_dim,)
        rows.append({
            "model": f"{cls.__name__} ({name})",
            "parameters": model.num_parameters(),
            "latent": "x".join(map(str, [*grid, c])) + ("" if side == size
                                                           else f" ({side}x{side} crop)"),
            "encode_macs": count_macs(model, side, side, "encode"),
            "decode_macs": count_macs(model, side, side, "decode"),
        })
    return rows


def markdown_table(rows: list[dict[str, object]], size: int) -> str:
    lines = [f"| model | parameters | latent ({size}x{size} input) | encode MACs | decode MACs |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['latent']} | "
                     f"{r['encode_macs'] / 1e6:.1f} M | {r['decode_macs'] / 1e6:.1f} M |")
    t, s = rows[0], rows[1]  # the teacher and the student come first in the registry
    p_ratio = t["parameters"] / s["parameters"]  # type: ignore[operator]
    t_macs = t["encode_macs"] + t["decode_macs"]  # type: ignore[operator]
    s_macs = s["encode_macs"] + s["decode_macs"]  # type: ignore[operator]
    lines.append(f"\nteacher/student: {p_ratio:.1f}x parameters, "
                 f"{t_macs / s_macs:.1f}x MACs (encode+decode)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    print(markdown_table(summary_rows(args.size), args.size))


if __name__ == "__main__":
    main()
