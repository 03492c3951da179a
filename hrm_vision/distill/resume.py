"""What a resumed run takes from its checkpoint, and what it must not change.

``run(resume=PATH)`` continues the phase the checkpoint was written in, with that checkpoint's
models, into any ``checkpoint_dir`` (its own folder or a new one):

- the config fields that shape the run must equal the checkpoint's stored config; only
  :data:`RESUME_MAY_CHANGE` may differ (how long it trains, where it runs and writes, what it
  logs). Anything else is a :class:`ResumeMismatch` listing each field
  (``batch_size: checkpoint 64, now 32``), unless the caller forces the resume;
- a checkpoint of the distillation or fine-tuning phase continues with the teacher it was trained
  with (:func:`resumed_teacher`: the file its ``teacher_source`` names, or the ``teacher.pth``
  beside the checkpoint when its whole folder moved), never a newly pre-trained one;
- resumed into a new folder, the phase's best checkpoint (``tinyvae_best.pth``,
  ``teacher_best.pth``) comes along from the checkpoint's folder (:func:`carry_best`), so the new
  folder ends with it even when no resumed epoch beats it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import CheckpointError, atomic_write, load_checkpoint
from .config import DistillConfig
from .phases import DistillPhase, FinetunePhase, Phase, TeacherPhase
from .state import TrainState

#: Config fields a resumed run may change: how many epochs each phase trains (and when it
#: stops early), where it runs, reads and writes, and what it logs. Every other field shapes the
#: run (the models, the data, the batches, the optimisation, the loss) and must equal the
#: checkpoint's stored config.
RESUME_MAY_CHANGE = frozenset({
    "teacher_epochs", "epochs", "finetune_epochs", "early_stop_patience", "device",
    "num_workers", "data_dir", "download", "vgg16_weights", "teacher_cache", "max_bad_steps",
    "checkpoint_dir", "save_interval", "log_interval", "tensorboard"})

#: The command-line flag of each phase's epoch count (in the "nothing more" message).
EPOCH_FLAGS = {"teacher": "--teacher-epochs", "distill": "--epochs",
               "finetune": "--finetune-epochs"}


class ResumeMismatch(ValueError):
    """The config of a resumed run differs from its checkpoint's in a field that shapes it."""


def find_resume(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` continues from: the latest phase's ``*_last.pth``."""
    d = Path(checkpoint_dir)
    for phase in (FinetunePhase, DistillPhase, TeacherPhase):
        if (d / phase.last_file).is_file():
            return d / phase.last_file
    return None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def config_differences(stored: dict[str, Any], config: DistillConfig) -> list[str]:
    """``"field: checkpoint X, now Y"`` for each field outside :data:`RESUME_MAY_CHANGE` whose
    value in ``config`` differs from the ``stored`` config (a field the stored config lacks, from
    an older version, counts with its default)."""
    now = config.model_dump()
    differences = []
    for name, field in DistillConfig.model_fields.items():
        if name in RESUME_MAY_CHANGE:
            continue
        before = stored.get(name, field.default)
        if before != now[name]:
            differences.append(f"{name}: checkpoint {_show(before)}, now {_show(now[name])}")
    return differences


def check_config(payload: dict[str, Any], config: DistillConfig, source: str,
                 force: bool) -> list[str]:
    """The :func:`config_differences` between the checkpoint's stored config and ``config``;
    a :class:`ResumeMismatch` naming them all unless ``force``. A stored config that is not a
    dict is left to the type checks of the restore."""
    stored = payload.get("config")
    if not isinstance(stored, dict):
        return []
    differences = config_differences(stored, config)
    if differences and not force:
        raise ResumeMismatch(f"{source} was trained with another config: "
                             f"{'; '.join(differences)} (resume with the checkpoint's values, "
                             "or pass --force-resume to resume anyway)")
    return differences


def resumed_teacher(payload: dict[str, Any], config: DistillConfig, source: str,
                    needed: bool) -> Path | None:
    """The teacher file a student-phase checkpoint continues with: ``config.teacher_checkpoint``
    when given (it equals the stored one unless the resume was forced), else the file the
    checkpoint's ``teacher_source`` names, else ``teacher.pth`` beside the checkpoint when the
    source was its run's own pre-trained teacher (the folder moved); None when the run had no
    teacher. A ``CheckpointError`` says which file is needed when it is not there, or that the
    run had none when this run's loss ``needed`` one."""
    if config.teacher_checkpoint:
        return Path(config.teacher_checkpoint)
    named = payload.get("teacher_source", "")
    if not isinstance(named, str):
        raise CheckpointError(f"{source}: teacher_source must be a path, got "
                              f"{type(named).__name__}")
    if not named:
        if needed:
            raise CheckpointError(f"{source} was trained without a teacher, but this run's "
                                  "loss needs one (a perceptual backbone that resolved "
                                  "otherwise?)")
        return None
    if Path(named).is_file():
        return Path(named)
    stored = payload.get("config")
    own_dir = stored.get("checkpoint_dir") if isinstance(stored, dict) else None
    beside = Path(source).parent / "teacher.pth"
    if Path(named).name == "teacher.pth" and own_dir is not None \
            and Path(named).parent == Path(str(own_dir)) and beside.is_file():
        return beside
    raise CheckpointError(f"{source}: its {payload.get('phase')} phase was trained with the "
                          f"teacher {named}, which is not there: put that file back (or pass a "
                          "copy as --teacher-checkpoint FILE with --force-resume)")


def nothing_more(source: str, phase: Phase, state: TrainState,
                 finetune_epochs: int) -> str | None:
    """The message of a resumed ``phase`` whose ``state`` is at or past its last epoch (its
    epoch count was not raised): nothing to do, or going on with the next phase; None when
    epochs are left."""
    if state.epoch < phase.epochs:
        return None
    later = {"teacher": "distill", "distill": "finetune" if finetune_epochs > 0 else None
             }.get(phase.name)
    partial = (f" and {state.step_in_epoch} batches of epoch {state.epoch + 1}"
               if state.step_in_epoch else "")
    return (f"{source} is at epoch {state.epoch}{partial} of the {phase.name} phase; "
            f"{EPOCH_FLAGS[phase.name]} {phase.epochs} asks for nothing more"
            + (f" of it: going on with the {later} phase" if later else ": nothing to do"))


def carry_best(source: str, out_dir: Path, best_file: str, best_psnr: float,
               write: bool = True) -> str | None:
    """Resumed into a new folder, copy the checkpoint folder's ``best_file`` into ``out_dir``
    when it is the best the resumed state knows (its ``best_psnr`` equals ``best_psnr``).

    Returns None when nothing needs carrying (the same folder, or ``out_dir`` already holds the
    file) or the file was copied; otherwise why it could not be (missing, or the best of another
    point of the run). ``write`` False (ranks other than 0) checks without copying.
    """
    src_dir = Path(source).parent
    dest = out_dir / best_file
    if src_dir.resolve() == out_dir.resolve() or dest.exists():
        return None
    src = src_dir / best_file
    if not src.is_file():
        return f"{src} is not there"
    stored = load_checkpoint(src).get("best_psnr")
    if stored != best_psnr:
        return f"{src} holds the best of another point of the run (best_psnr {stored})"
    if write:
        data = src.read_bytes()
        atomic_write(dest, lambda f: f.write(data))
    return None


def settle_resumed(source: str, out_dir: Path, phase: Phase, state: TrainState,
                   finetune_epochs: int, write: bool = True) -> list[str]:
    """What a restored ``phase`` needs before it trains on: the messages to show
    (:func:`nothing_more`), and the phase's best checkpoint in ``out_dir`` (:func:`carry_best`;
    ``write`` on rank 0 only). When the best cannot come along, the best is picked again among
    the epochs still to train (``state.best_psnr`` reset); with no epoch left, a
    ``CheckpointError`` says which file is missing."""
    note = nothing_more(source, phase, state, finetune_epochs)
    notes = [note] if note else []
    problem = carry_best(source, out_dir, phase.best_file, state.best_psnr, write)
    if problem is None:
        return notes
    if note:
        raise CheckpointError(f"cannot resume {source} into {out_dir}: the {phase.name} phase "
                              f"has no epoch left to train and its best checkpoint {problem}; "
                              "resume into the checkpoint's own folder, or copy that file "
                              f"into {out_dir}")
    state.best_psnr = -math.inf
    return [*notes, f"{problem}: the best {phase.name} epoch is picked again among the epochs "
            "trained from now on"]
