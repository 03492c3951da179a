"""Knowledge distillation of the TinyVAE from the teacher VAE.

>>> from hrm_vision.distill import Distiller, load_config
>>> Distiller(load_config(None, {"dataset": "photos", "epochs": 2})).run()

Modules: ``config`` (the pydantic config), ``losses`` and ``perceptual`` (the objective),
``data`` (splits, the teacher cache, per-rank loaders, torchrun), ``phases`` (what each phase
trains and validates), ``optim`` (AdamW, schedule, precision, weight average), ``state`` (typed
training state and checkpoint), ``loop`` (one phase's training loop and its epoch commit),
``callbacks`` (pictures, console: they observe), ``trainer`` (the phases of a run),
``__main__`` (the command line).
"""

from ..vae import LatentAdapter
from .config import ConfigError, DistillConfig, load_config, save_config
from .data import TeacherCache
from .losses import TERMS, DistillLoss, TeacherTargets
from .trainer import Distiller, TrainingDiverged, TrainingInterrupted, find_resume

__all__ = ["TERMS", "ConfigError", "DistillConfig", "DistillLoss", "Distiller", "LatentAdapter",
           "TeacherCache", "TeacherTargets", "TrainingDiverged", "TrainingInterrupted",
           "find_resume", "load_config", "save_config"]
