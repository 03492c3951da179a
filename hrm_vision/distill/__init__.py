"""Knowledge distillation of the TinyVAE from the teacher VAE.

>>> from hrm_vision.distill import Distiller, load_config
>>> Distiller(load_config(None, {"dataset": "photos", "epochs": 2})).run()
"""

from .adapter import LatentAdapter
from .config import ConfigError, DistillConfig, load_config, save_config
from .losses import TERMS, DistillLoss, TeacherTargets
from .trainer import Distiller, TeacherCache, TrainingDiverged, TrainingInterrupted, find_resume

__all__ = ["TERMS", "ConfigError", "DistillConfig", "DistillLoss", "Distiller", "LatentAdapter",
           "TeacherCache", "TeacherTargets", "TrainingDiverged", "TrainingInterrupted",
           "find_resume", "load_config", "save_config"]
