"""Knowledge distillation of the TinyVAE from the teacher VAE.

>>> from hrm_vision.train import Distiller, load_config
>>> Distiller(load_config(None, {"dataset": "photos", "epochs": 2})).run()

``config`` (the pydantic config and its flags), ``loss`` (the whole objective), ``trainer``
(the training loop, resume, DDP, data, and the ``distill`` command), ``callbacks`` (pictures,
TensorBoard, console: they observe). The trainer's names load on first use, so that
``hrm_vision.metrics`` can use the objective's KL without importing the trainer.
"""

from typing import Any

from .config import ConfigError, DistillConfig, load_config, save_config
from .loss import TERMS, DistillLoss, TeacherTargets

#: Names of :mod:`hrm_vision.train.trainer` this package exports.
TRAINER_NAMES = ("Distiller", "TeacherCache", "TrainingDiverged", "TrainingInterrupted",
                 "command", "find_resume")

__all__ = ["TERMS", "ConfigError", "DistillConfig", "DistillLoss", "TeacherTargets",
           "load_config", "save_config", *TRAINER_NAMES]


def __getattr__(name: str) -> Any:
    if name in TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
