"""Trainer callbacks: what is shown or drawn besides the training itself.

The trainer calls the hooks on rank 0 only: first :func:`default_callbacks` (pictures, optional
TensorBoard, progress bar, console log), then the user's. Callbacks observe: the training loop
writes the checkpoints and ``history.json`` after the ``on_epoch_end`` hooks, so every
callback's files are written before the epoch's commit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._extras import require
from ..io import atomic_write

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

#: What the hooks receive as ``trainer``: the running :class:`~hrm_vision.train.Distiller`
#: (read-only for callbacks: ``config``, ``out_dir``, ``history``, the models).
Distiller = Any
#: What the hooks receive as ``phase``: the running :class:`~hrm_vision.train.trainer.Phase`
#: (``name``, ``epochs``, ``epoch_picture_rows(epoch)``).
Phase = Any


class Callback:
    """Base class: every hook does nothing. ``on_phase_begin`` is not called on a resume;
    ``on_interrupt`` runs when a stop signal ends a phase mid-epoch."""

    def on_train_begin(self, trainer: Distiller) -> None: ...
    def on_phase_begin(self, trainer: Distiller, phase: Phase) -> None: ...
    def on_epoch_begin(self, trainer: Distiller, phase: Phase, epoch: int,
                       num_batches: int) -> None: ...
    def on_batch_end(self, trainer: Distiller, phase: Phase, step: int,
                     terms: dict[str, float]) -> None: ...
    def on_log(self, trainer: Distiller, phase: Phase, step: int,
               terms: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Distiller, phase: Phase, record: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: Distiller, phase: Phase) -> None: ...
    def on_phase_end(self, trainer: Distiller, phase: Phase) -> None: ...
    def on_message(self, trainer: Distiller, message: str) -> None: ...
    def on_train_end(self, trainer: Distiller) -> None: ...


def default_callbacks(console: bool = True, tensorboard: bool = False) -> list[Callback]:
    """Pictures, TensorBoard (``MissingExtraError`` without the extra), and with ``console``
    the progress bar and the console log."""
    files: list[Callback] = [PictureWriter()]
    if tensorboard:
        files.append(TensorBoardWriter())
    return files + ([ProgressBar(), ConsoleLog()] if console else [])


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in terms.items())


def _shares(shares: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.1f}%" for k, v in shares.items())


class ProgressBar(Callback):
    """One tqdm bar per epoch showing the running mean total loss (only on a terminal)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.total = 0.0
        self.count = 0

    def on_epoch_begin(self, trainer: Distiller, phase: Phase, epoch: int,
                       num_batches: int) -> None:
        self.bar = tqdm(total=num_batches, desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                        leave=False, dynamic_ncols=True, disable=None)
        self.total, self.count = 0.0, 0

    def on_batch_end(self, trainer: Distiller, phase: Phase, step: int,
                     terms: dict[str, float]) -> None:
        if self.bar is not None:
            self.total += terms["total"]
            self.count += 1
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.total / self.count:.4g}")

    def on_epoch_end(self, trainer: Distiller, phase: Phase, record: dict[str, Any]) -> None:
        self.on_train_end(trainer)

    def on_train_end(self, trainer: Distiller) -> None:  # also closes a bar left by an abort
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleLog(Callback):
    """Prints the loss terms every ``log_interval`` batches and one summary line per epoch."""

    def on_message(self, trainer: Distiller, message: str) -> None:
        tqdm.write(message)

    def on_log(self, trainer: Distiller, phase: Phase, step: int,
               terms: dict[str, float]) -> None:
        tqdm.write(f"[{phase.name}] batch {step}: {_fmt(terms)}")

    def on_epoch_end(self, trainer: Distiller, phase: Phase, record: dict[str, Any]) -> None:
        val = record["val"]
        head = (f"[{phase.name}] epoch {record['epoch']}/{phase.epochs} "
                f"({record['time_s']:.0f}s, {record['train_img_per_s']:.0f} img/s)")
        tqdm.write(f"{head} train total={record['train']['total']:.4g} | val {_fmt(val)}"
                   + ("  [best]" if record.get("is_best") else ""))
        if record.get("value_share"):
            tqdm.write(f"[{phase.name}] shares of the objective {_shares(record['value_share'])}"
                       f" | of its gradient {_shares(record['gradient_share'])}")


class PictureWriter(Callback):
    """Per epoch: ``{phase}_epoch_XXX.png`` (rows: inputs, teacher, student),
    ``loss_curves.png`` (train and validation total loss and PSNR per epoch) and ``curves.png``
    (training-crop, held-out and unseen PSNR per epoch); without matplotlib the two curve files
    are skipped with a warning."""

    def __init__(self) -> None:
        self.warned = False

    def on_epoch_end(self, trainer: Distiller, phase: Phase, record: dict[str, Any]) -> None:
        out = trainer.out_dir
        rows = phase.epoch_picture_rows(record["epoch"])
        if rows:
            save_grid(rows, out / f"{phase.name}_epoch_{record['epoch']:03d}.png")
        try:
            require("matplotlib", extra="train", purpose="the curves (loss_curves.png, curves.png)")
        except ImportError as exc:
            if not self.warned:
                log.warning("%s: skipped", exc)
                self.warned = True
            return
        save_loss_curves(trainer.history, out / "loss_curves.png")
        save_psnr_curves(trainer.history, out / "curves.png")


class TensorBoardWriter(Callback):
    """TensorBoard event files in ``checkpoint_dir/tensorboard/``. Per epoch (step = the
    phase's 1-based epoch): scalars ``{phase}/{train,val,value_share,gradient_share}/{key}``
    and ``{phase}/lr``, and the image ``{phase}/reconstructions``. Needs the ``tensorboard``
    extra (else ``MissingExtraError``)."""

    FOLDER = "tensorboard"

    def __init__(self) -> None:
        require("tensorboard", extra="tensorboard",
                purpose="TensorBoard logging (the tensorboard config key)")
        from torch.utils.tensorboard import SummaryWriter

        self._make_writer = SummaryWriter
        self.writer: Any = None

    def on_train_begin(self, trainer: Distiller) -> None:
        self.writer = self._make_writer(log_dir=str(trainer.out_dir / self.FOLDER))

    def on_epoch_end(self, trainer: Distiller, phase: Phase, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["epoch"]
        for part in ("train", "val", "value_share", "gradient_share"):
            for key, value in record.get(part, {}).items():
                self.writer.add_scalar(f"{phase.name}/{part}/{key}", value, step)
        self.writer.add_scalar(f"{phase.name}/lr", record["lr"], step)
        rows = phase.epoch_picture_rows(record["epoch"])
        if rows:
            self.writer.add_image(f"{phase.name}/reconstructions", np.asarray(grid_image(rows)),
                                  step, dataformats="HWC")
        self.writer.flush()  # on disk before the epoch's commit

    def on_train_end(self, trainer: Distiller) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 4) -> None:
    """:func:`grid_image` of ``rows`` written as a PNG file at ``path``."""
    canvas = grid_image(rows, scale)
    atomic_write(path, lambda f: canvas.save(f, format="png"))


def grid_image(rows: list[tuple[str, torch.Tensor]], scale: int = 4) -> PILImage:
    """Labelled rows of images (each ``(n, 3, H, W)`` in [0, 1], the first ``n`` of the
    smallest row) as one RGB PIL image, pixels enlarged ``scale`` times (nearest), labels on the
    left: ``(n * (W + 1) + 1) * scale + 80`` wide, ``(len(rows) * (H + 1) + 1) * scale`` high."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    n = min(r.shape[0] for _, r in rows)
    grid = make_grid(torch.cat([r[:n].detach().float().cpu().clamp(0, 1) for _, r in rows]),
                     nrow=n, padding=1, pad_value=1.0)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(pixels).resize((grid.shape[2] * scale, grid.shape[1] * scale),
                                          Image.Resampling.NEAREST)
    label_width = 80
    canvas = Image.new("RGB", (image.width + label_width, image.height), "white")
    canvas.paste(image, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = image.height / len(rows)
    for i, (label, _) in enumerate(rows):
        draw.text((4, int(i * row_height + row_height / 2) - 5), label, fill="black")
    return canvas


#: The PSNRs ``curves.png`` draws: validation key and label.
CURVES = (("train_psnr", "training crops"), ("psnr", "held-out"), ("unseen_psnr", "unseen source"))


def save_psnr_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Generalisation in view: the PSNR (dB, decode of mu) of the training crops, the held-out
    crops and the unseen-source crops per epoch, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(r["phase"] for r in history))
    if not phases:
        return
    fig, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.5), squeeze=False)
    for ax, name in zip(axes[0], phases, strict=True):
        recs = [r for r in history if r["phase"] == name]
        for key, label in CURVES:
            points = [(r["epoch"], r["val"][key]) for r in recs if key in r["val"]]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=label)
        ax.set(title=f"{name}: PSNR (dB)", xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)


def save_loss_curves(history: list[dict[str, Any]], path: Path) -> None:
    """The objective (train, val; nats per image, can be negative) and validation PSNR per
    epoch, one panel pair per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(r["phase"] for r in history))
    if not phases:
        return
    fig, axes = plt.subplots(len(phases), 2, figsize=(9, 3 * len(phases)), squeeze=False)
    for row, name in zip(axes, phases, strict=True):
        recs = [r for r in history if r["phase"] == name]
        ep = [r["epoch"] for r in recs]
        row[0].plot(ep, [r["train"]["total"] for r in recs], "o-", label="train")
        row[0].plot(ep, [r["val"]["total"] for r in recs], "o-", label="val")
        row[0].set(title=f"{name}: objective (nats per image)", xlabel="epoch")
        row[0].legend()
        for key, label in (("psnr", "student" if name != "teacher" else "teacher"),
                           ("teacher_psnr", "teacher")):
            vals = [r["val"].get(key) for r in recs]
            if any(v is not None for v in vals):
                row[1].plot(ep, vals, "o-", label=label)
        row[1].set(title=f"{name}: validation PSNR (dB)", xlabel="epoch")
        row[1].legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)
