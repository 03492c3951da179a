"""The config of the SAGE drop-in (:mod:`hrm_vision.irp.sage`): SAGE's keys and hrm-vision's.

SAGE passes plugins a plain dict. :class:`SageConfig` validates it once, when the plugin is
created (unknown keys are errors that name them); the halting keys SAGE writes into
``plugin.config`` afterwards are read, and checked, at each run (:meth:`SageConfig.live_halting`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..io import describe_validation_error

#: Environment variable naming the checkpoint used when ``checkpoint`` is not given, so SAGE's
#: scripts run trained weights with only the import swapped.
CHECKPOINT_ENV = "HRM_VISION_SAGE_CHECKPOINT"
#: SAGE's sizes: a 64x64 RGB crop, a 64-number latent.
SAGE_LATENT_DIM, SAGE_INPUT_CHANNELS, SAGE_IMG_SIZE = 64, 3, 64


class Sizes(NamedTuple):
    """The sizes a plugin runs with: latent size, channels of the caller's crops, crop side."""

    latent_dim: int
    input_channels: int
    img_size: int


class SageConfig(BaseModel):
    """The plugin's config; SAGE's keys first, then hrm-vision's. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # SAGE's IRPPlugin keys
    entity_id: str = Field("tinyvae_irp", description="name in SAGE's telemetry")
    max_iterations: int = Field(20, ge=1, description="states per run, the encoder's included")
    halt_eps: float = Field(1e-4, ge=0, description="halt when the energy falls by less than "
                                                    "halt_eps * first energy per step")
    halt_K: int = Field(3, ge=1, description="steps the halting slope is taken over")
    trust_weight: float = Field(1.0, description="SAGE's initial trust weight (kept as given)")
    ATP_per_step: float = Field(0.1, ge=0, description="ATP per state in emit_telemetry's budget")
    max_ATP: float | None = Field(None, description="SAGE's budget (SAGE writes and reads it)")
    LRC_context: Any = Field(None, description="passed through to emit_telemetry")
    device: Any = Field(None, validate_default=True,
                        description="'cpu', 'cuda', 'cuda:N', 'jetson' (CUDA) or a "
                                    "torch.device; default CUDA when available")
    # SAGE's TinyVAE keys
    latent_dim: int | None = Field(None, ge=1, description="latent size (default: the "
                                                           "checkpoint's, else 64)")
    input_channels: Literal[1, 3] | None = Field(None, description="channels of the crops")
    img_size: int | None = Field(None, ge=8, multiple_of=8, description="side the model sees")
    beta_kl: float = Field(0.1, ge=0, description="SAGE's training KL weight, reported only")
    use_fp16: bool = Field(False, description="float16 autocast on CUDA (no-op on the CPU)")
    normalize: bool = Field(False, description="SAGE's own model normalised its input; "
                                               "not used here (see value_range)")
    mean: list[float] | None = Field(None, description="with normalize; not used")
    std: list[float] | None = Field(None, description="with normalize; not used")
    # hrm-vision's keys
    checkpoint: Path | None = Field(None, description="tinyvae_best.pth or .safetensors")
    value_range: tuple[float, float] = Field((0.0, 1.0), description="range of float pixels")
    channel_order: Literal["rgb", "bgr"] | None = Field(
        None, description="3-channel crops; None: tensors RGB, numpy arrays refused")
    resize: bool = Field(True, description="resize crops of another size to img_size")
    step_size: float = Field(0.1, gt=0, description="initial latent step (RMS per element)")
    max_backtracks: int = Field(4, ge=0, description="halvings of a step that raised the energy")
    prior_weight: float = Field(1e-4, ge=0, description="weight of the 0.5*mean(z^2) term")
    latent_bound: float = Field(6.0, gt=0, description="latent range (widened to include mu)")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SageConfig:
        """Validate ``config``; a ``ValueError`` names each bad or unknown key.

        Without a ``checkpoint`` key, :data:`CHECKPOINT_ENV` names the checkpoint when it is set.
        """
        if "checkpoint" not in config and os.environ.get(CHECKPOINT_ENV):
            config = {**config, "checkpoint": os.environ[CHECKPOINT_ENV]}
        try:
            settings = cls.model_validate(config)
        except ValidationError as exc:
            problems = describe_validation_error(exc, known=cls.model_fields)
            raise ValueError(f"create_tinyvae_irp: {problems}") from exc
        if settings.normalize:
            warnings.warn("normalize=True: SAGE's own TinyVAE normalised [0, 1] crops inside the "
                          "plugin; this model reads crops as they are, in value_range "
                          f"{settings.value_range}, so normalize/mean/std are not used",
                          UserWarning, stacklevel=4)
        return settings

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[1] > value[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value}")
        return value

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"checkpoint file not found: {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: Any) -> str:
        if value is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        text = str(value)
        if text == "jetson":
            text = "cuda"
        try:
            device = torch.device(text)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {value!r} (use 'cpu', 'cuda' or 'jetson')") \
                from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} needs CUDA, which is not available; use 'cpu'")
        return text

    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def as_sage_dict(self, sizes: Sizes) -> dict[str, Any]:
        """The plain dict kept as ``plugin.config`` (SAGE reads and writes it)."""
        values = self.model_dump()
        values.update(sizes._asdict())
        values["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        values["value_range"] = list(self.value_range)
        return values

    @staticmethod
    def live_halting(config: dict[str, Any]) -> tuple[int, float, int]:
        """``(max_iterations, halt_eps, halt_K)`` from the dict SAGE may have written into.

        SAGE's orchestrator writes ``max_iterations = int(budget * 10)``, which can be 0: a
        value below 1 means one state, the encoder's guess (as in SAGE's own loop).
        """
        values = []
        for key, kind in (("max_iterations", int), ("halt_eps", float), ("halt_K", int)):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or (kind is int and value != int(value)):
                raise ValueError(f"plugin.config[{key!r}] must be a number, got {value!r}")
            values.append(kind(value))
        if values[1] < 0 or values[2] < 1:
            raise ValueError(f"plugin.config halt_eps must be >= 0 and halt_K >= 1, got "
                             f"{values[1]}, {values[2]}")
        return max(1, values[0]), values[1], values[2]


def model_sizes(settings: SageConfig, model: torch.nn.Module | None) -> Sizes:
    """The sizes to run with: SAGE's kwargs checked against ``model`` (the checkpoint's).

    Raises ``ValueError`` naming the kwarg that disagrees with the checkpoint's model.
    """
    if model is None:
        return Sizes(settings.latent_dim or SAGE_LATENT_DIM,
                     settings.input_channels or SAGE_INPUT_CHANNELS,
                     settings.img_size or SAGE_IMG_SIZE)
    where = f"the checkpoint {settings.checkpoint}"
    latent_dim = int(model.latent_dim)
    if settings.latent_dim is not None and settings.latent_dim != latent_dim:
        raise ValueError(f"latent_dim={settings.latent_dim} disagrees with {where}, whose model "
                         f"has latent_dim {latent_dim}; drop latent_dim or pass {latent_dim}")
    channels = int(getattr(model, "in_channels", 3))
    input_channels = settings.input_channels or channels
    if input_channels == 3 and channels == 1:
        raise ValueError(f"input_channels=3 disagrees with {where}, whose model takes 1-channel "
                         "crops; pass input_channels=1 and grey crops")
    arch = model.arch_config() if hasattr(model, "arch_config") else {}
    fixed = arch.get("image_size")  # the compact models take one crop size
    if settings.img_size is not None and fixed is not None and settings.img_size != fixed:
        raise ValueError(f"img_size={settings.img_size} disagrees with {where}, whose model "
                         f"takes {fixed}x{fixed} crops; drop img_size or pass {fixed}")
    return Sizes(latent_dim, input_channels, settings.img_size or fixed or SAGE_IMG_SIZE)
