"""The distillation config (pydantic, ``extra="forbid"``, range checks) and its flags: every
field is a ``--field-name`` flag and a row of ``docs/training.md`` (``training/config_table.py``).

>>> cfg = load_config("my.json", overrides={"epochs": 3})   # flags override the file
>>> save_config(cfg, "checkpoints/config.json")               # the effective config
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..compact import CompactVAE
from ..data import STREAM_SCALES
from ..io import describe_validation_error, write_json
from ..vae import BITS_PER_PIXEL, DOWNSAMPLE_FACTOR, MAX_BITS_PER_PIXEL, MODELS, image_size_fits

Backbone = Literal["auto", "vgg16", "teacher"]
Precision = Literal["auto", "off", "bf16", "fp16"]
FreeBitsMode = Literal["total", "channel"]
Crops = Literal["fixed", "stream"]
#: Datasets that hold photographs to stream crops from, or to validate as unseen.
PHOTO_DATASETS = ("photos", "imagefolder")


#: Upper bounds that catch a typo or a unit mistake before anything starts.
MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 4096  # latent sizes and base channel counts
MAX_BLOCKS = 64  # residual blocks per teacher stage
MAX_BATCH = 65536  # batch size, batches per optimizer step
MAX_EPOCHS = 100_000
MAX_WORKERS = 512  # DataLoader worker processes
MAX_COUNT = 10**9  # sample counts, steps and intervals


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file, field or position."""


class DistillConfig(BaseModel):
    """Everything a distillation run needs; the loss weights multiply the five terms of
    :class:`hrm_vision.train.loss.DistillLoss`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # ---------------------------------------------------------------- data
    dataset: str = Field("cifar10", description="dataset name in hrm_vision.data (cifar10, "
                         "imagefolder, photos)")
    data_dir: str = Field("./data", description="where the dataset lives (cifar10, imagefolder)")
    download: bool = Field(False, description="allow downloading the dataset (cifar10) and VGG16 "
                           "weights")
    image_size: int = Field(32, ge=8, description="image side in pixels, a multiple of 8, at "
                            f"most {MAX_IMAGE_SIZE}")
    train_samples: int | None = Field(None, ge=1, le=MAX_COUNT, description="use only the "
                                      "first N training images (None: all)")
    val_samples: int | None = Field(None, ge=2, le=MAX_COUNT, description="use only the first "
                                    "N validation images (None: all)")
    crops: Crops = Field("fixed", description="fixed: the training crops are cut once; stream "
                         "(photos, imagefolder): train_samples fresh crops every epoch from the "
                         "full-size training photographs (random position, scale between "
                         "crop_scale_min and crop_scale_max, flips), the teacher run on the fly")
    crop_scale_min: float = Field(STREAM_SCALES[0], gt=0, le=1, description="crops stream: "
                                  "the least scale of a photograph before a training crop (a "
                                  "square of side image_size / scale resized to image_size); "
                                  "validation crops keep scales "
                                  f"{STREAM_SCALES[0]:g} to {STREAM_SCALES[1]:g}")
    crop_scale_max: float = Field(STREAM_SCALES[1], gt=0, le=1, description="crops stream: "
                                  "the greatest scale of a photograph before a training crop "
                                  "(1: its own pixels)")
    unseen_dataset: str | None = Field(None, description="a second collection whose fixed crops "
                                       "(val_samples, default 1024) are validated as unseen_psnr: "
                                       "photos (all its photographs) or imagefolder "
                                       "(unseen_data_dir)")
    unseen_data_dir: str | None = Field(None, description="the image folder of unseen_dataset "
                                        "imagefolder")
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="DataLoader worker processes "
                             "(they prepare the batches off the training thread)")
    # ---------------------------------------------------------------- models
    teacher_model: str = Field("teacher", description="registry name of the teacher "
                               "(hrm_vision.vae.MODELS: teacher, compact_teacher)")
    student_model: str = Field("tinyvae", description="registry name of the student "
                               "(hrm_vision.vae.MODELS: tinyvae, compact_student); a compact "
                               "model takes image_size as its crop side")
    teacher_latent_dim: int = Field(512, ge=1, le=MAX_CHANNELS,
                                    description="teacher latent channels on the H/8 x W/8 grid "
                                    "(a compact teacher: numbers per crop)")
    student_latent_dim: int = Field(128, ge=1, le=MAX_CHANNELS,
                                    description="student latent channels on the H/8 x W/8 grid "
                                    "(a compact student: numbers per crop)")
    teacher_base_channels: int = Field(64, ge=1, le=MAX_CHANNELS, description="width of the "
                                       "teacher's first stage")
    teacher_blocks_per_stage: int = Field(1, ge=1, le=MAX_BLOCKS, description="residual blocks "
                                          "per teacher stage")
    student_base_channels: int = Field(32, ge=1, le=MAX_CHANNELS, description="width of the "
                                       "student's first stage")
    # ---------------------------------------------------------------- optimisation
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="images per batch (per process "
                            "under torchrun)")
    epochs: int = Field(100, ge=0, le=MAX_EPOCHS, description="distillation epochs (phase 2)")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate after the "
                                 "warm-up (3e-4: measured in docs/models.md)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="decay of the exponential moving "
                             "average of the trained weights, used for validation and every "
                             "saved model (0: off, the raw weights)")
    warmup_steps: int = Field(100, ge=0, le=MAX_COUNT, description="linear warm-up optimizer "
                              "steps before the cosine decay")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (None: off)")
    grad_accum_steps: int = Field(1, ge=1, le=MAX_BATCH, description="batches per optimizer step")
    mixed_precision: Precision = Field("auto", description="auto: fp16 with a scaler on CUDA, "
                                       "off on CPU; bf16/fp16/off force it (bf16 on a CPU with "
                                       "avx512_bf16 or AMX)")
    channels_last: bool = Field(False, description="images and convolution weights in "
                                "channels-last memory order (with bf16 on a CPU that has it: "
                                "benchmarks/train_step.py)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of Python, NumPy and torch")
    early_stop_patience: int | None = Field(10, ge=1, le=MAX_EPOCHS, description="stop a "
                                            "phase after this many epochs without a better "
                                            "validation PSNR (None: never)")
    max_bad_steps: int = Field(10, ge=1, le=MAX_COUNT, description="stop after this many bad "
                               "steps in a row (non-finite loss, or non-finite weights after "
                               "the optimizer step, which is undone)")
    # ---------------------------------------------------------------- loss
    recon_weight: float = Field(0.3, ge=0, description="weight of the reconstruction: a "
                                "Gaussian negative log-likelihood in nats per image with a "
                                "learned scale")
    kl_weight: float = Field(0.1, ge=0, description="weight of the KL term (nats per image, "
                             "above the free-bits floor)")
    kl_free_bits: float = Field(BITS_PER_PIXEL, ge=0, le=MAX_BITS_PER_PIXEL,
                                description="KL floor in bits per pixel of the image, the same "
                                "budget for any latent size (teacher and student): a KL below "
                                "it is free (no gradient)")
    free_bits_mode: FreeBitsMode = Field("total", description="total: one floor on the whole "
                                         "latent's KL (the model spends the rate where it "
                                         "helps most); channel: one floor per latent channel")
    kl_target: float | None = Field(None, gt=0, le=MAX_BITS_PER_PIXEL,
                                    description="hold the KL at this many bits per pixel with a "
                                    "Lagrange multiplier on the KL term (instead of kl_weight "
                                    "above the floor; None: off)")
    distill_latent_weight: float = Field(0.3, ge=0, description="weight of the latent "
                                         "distillation term (teacher posterior vs adapter)")
    distill_recon_weight: float = Field(0.2, ge=0, description="weight of the output "
                                        "distillation term (student vs teacher images)")
    perceptual_weight: float = Field(0.1, ge=0, description="weight of the perceptual "
                                     "feature-matching term")
    temperature: float = Field(3.0, gt=0, description="latent distillation temperature: "
                               "scales both posteriors' standard deviations")
    distill_recon_bounded: bool = Field(False, description="teacher-bounded output "
                                        "distillation: the distill_recon term counts a pixel "
                                        "only where the teacher is closer to the input than the "
                                        "student")
    perceptual_backbone: Backbone = Field("auto", description="auto: VGG16 if its weights "
                                           "are on disk, else the teacher's first block")
    vgg16_weights: str | None = Field(None, description="path to torchvision vgg16 weights")
    # ---------------------------------------------------------------- phases
    teacher_checkpoint: str | None = Field(None, description="a trained teacher to reuse "
                                           "(default: checkpoint_dir/teacher.pth if present)")
    teacher_epochs: int = Field(20, ge=0, le=MAX_EPOCHS,
                                description="phase 1 (teacher pre-training) epochs")
    teacher_cache: bool = Field(True, description="precompute the frozen teacher's outputs once")
    finetune_epochs: int = Field(0, ge=0, le=MAX_EPOCHS,
                                 description="phase 3: student alone, decoder first")
    # ---------------------------------------------------------------- output
    device: str | None = Field(None, description="cuda / cpu / cuda:1 (None: cuda if available)")
    checkpoint_dir: str = Field("checkpoints", description="where checkpoints, history.json, "
                                "config.json and pictures go (a folder, created if missing)")
    save_interval: int = Field(5, ge=1, le=MAX_COUNT,
                               description="write tinyvae_epoch_XXX.pth every N epochs")
    log_interval: int = Field(50, ge=1, le=MAX_COUNT,
                              description="print the loss terms every N batches")
    tensorboard: bool = Field(False, description="also write TensorBoard event files to "
                              "checkpoint_dir/tensorboard/: every epoch's training and "
                              "validation values, learning rate and reconstruction grid (needs "
                              "the tensorboard extra)")

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if not image_size_fits(v, v):
            raise ValueError(f"image_size must be a multiple of {DOWNSAMPLE_FACTOR}, got {v}")
        if v > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {v}")
        return v

    @field_validator("teacher_model", "student_model")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of {sorted(MODELS)}")
        return v

    @model_validator(mode="after")
    def _one_latent_kind(self) -> DistillConfig:
        compact = {role: issubclass(MODELS[name], CompactVAE) for role, name in
                   (("student", self.student_model), ("teacher", self.teacher_model))}
        if compact["student"] != compact["teacher"]:
            raise ValueError(f"student_model {self.student_model!r} and teacher_model "
                             f"{self.teacher_model!r} must both be compact (vector latents) or "
                             "both spatial: the adapter maps one latent kind")
        return self

    @model_validator(mode="after")
    def _data_sources(self) -> DistillConfig:
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError(f"crop_scale_min ({self.crop_scale_min:g}) must not exceed "
                             f"crop_scale_max ({self.crop_scale_max:g})")
        if self.crops == "stream" and self.dataset not in PHOTO_DATASETS:
            raise ValueError(f"crops 'stream' needs photographs: dataset photos or imagefolder, "
                             f"got {self.dataset!r}")
        unseen, folder = self.unseen_dataset, self.unseen_data_dir
        if unseen is not None and unseen not in PHOTO_DATASETS:
            raise ValueError(f"unseen_dataset must be photos or imagefolder, got {unseen!r}")
        if (unseen == "imagefolder") != (folder is not None):
            raise ValueError("unseen_data_dir goes with unseen_dataset imagefolder (and only "
                             f"with it), got unseen_dataset {unseen!r}, unseen_data_dir {folder!r}")
        same = unseen == self.dataset and (unseen == "photos" or Path(str(folder)).expanduser(
            ).resolve() == Path(self.data_dir).expanduser().resolve())
        if same:
            raise ValueError(f"unseen_dataset is the training collection ({unseen}"
                             f"{'' if folder is None else ' ' + folder}); name another one")
        return self

    @field_validator("checkpoint_dir")
    @classmethod
    def _a_folder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("checkpoint_dir must name a folder, got an empty string")
        path = Path(v)
        if path.exists() and not path.is_dir():
            raise ValueError(f"checkpoint_dir {v} is an existing file, not a folder")
        return v


def make_config(values: dict[str, Any], source: str = "values") -> DistillConfig:
    """Validate ``values`` into a config; a ``ConfigError`` names every bad field."""
    try:
        return DistillConfig(**values)
    except ValidationError as exc:
        problems = describe_validation_error(exc, DistillConfig.model_fields)
        raise ConfigError(f"invalid config {source}: {problems}") from None


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``; a syntax error is reported with its line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a UTF-8 text file: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting too deep
        raise ConfigError(f"{path} is not a JSON file this parser can read: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of config keys, got "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the JSON file at ``path`` (if any), then ``overrides`` (explicit flags)."""
    values: dict[str, Any] = read_json(path) if path is not None else {}
    values.update(overrides or {})
    source = str(path) if path is not None else "(command line)"
    return make_config(values, source)


def save_config(config: DistillConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as indented JSON (loadable by :func:`load_config`), atomically."""
    return write_json(config.model_dump(), path, indent=2)


#: Short flag names that differ from the config field names.
ALIASES = {"learning_rate": ["--lr"]}


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str) -> argparse.ArgumentParser:
    """``--config``, ``--resume``, ``--force-resume`` and one flag per config field. Flags
    default to "not given": only the flags on the command line override ``--config FILE``."""
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--config FILE] [--resume PATH|auto] [--FIELD VALUE ...]",
        description="Distil the TinyVAE (MinimalVAE) from a teacher VAE: pre-train the teacher if "
                    "none is given or found, distil, write checkpoints, history and pictures.")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file of config keys; flags given here override it")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a *_last.pth checkpoint, or 'auto' for the latest "
                             "in checkpoint_dir; the checkpoint's phase and models continue, "
                             "into checkpoint_dir (its own folder or a new one)")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even when config fields that shape the run (models, data, "
                             "batches, optimisation, loss) differ from the checkpoint's")
    group = parser.add_argument_group("config keys (every key is described in docs/training.md)")
    for name, field in DistillConfig.model_fields.items():
        flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, [])]
        help_text = (field.description or name) + f" (default: {field.default})"
        args = typing.get_args(field.annotation)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else field.annotation
        if base is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is Literal:
            group.add_argument(*flags, dest=name, choices=list(typing.get_args(base)),
                               default=argparse.SUPPRESS, help=help_text)
        else:
            kind = base if base in (int, float, str) else str
            group.add_argument(*flags, dest=name, type=_optional(kind) if optional else kind,
                               default=argparse.SUPPRESS, metavar=name.upper(),
                               help=help_text + (" ('none' for None)" if optional else ""))
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults < ``--config`` file < flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in DistillConfig.model_fields}
    return load_config(args.config, given)
