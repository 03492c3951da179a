"""Knowledge distillation of the TinyVAE from the teacher VAE.

>>> from hrm_vision.train import Distiller, load_config
>>> Distiller(load_config(None, {"dataset": "photos", "epochs": 2})).run()

``config`` (the pydantic config and its flags), ``loss`` (the whole objective), ``trainer``
(the training loop, resume, DDP, data, and the ``distill`` command), ``callbacks`` (pictures,
TensorBoard, console: they observe).
"""

from .config import ConfigError, DistillConfig, load_config, save_config
from .loss import TERMS, DistillLoss, TeacherTargets
from .trainer import (
    Distiller,
    TeacherCache,
    TrainingDiverged,
    TrainingInterrupted,
    command,
    find_resume,
)

__all__ = ["TERMS", "ConfigError", "DistillConfig", "DistillLoss", "TeacherTargets",
           "load_config", "save_config", "Distiller", "TeacherCache", "TrainingDiverged",
           "TrainingInterrupted", "command", "find_resume"]
