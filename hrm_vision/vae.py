"""The VAEs: ``TeacherVAE`` and ``MinimalVAE`` (alias ``TinyVAE``), their shared base, the
student-to-teacher ``LatentAdapter`` and the model registry.

>>> model = MinimalVAE(latent_dim=128, base_channels=32).eval()
>>> z = model.encode(images)   # (B, 3, H, W) in [0, 1], H, W divisible by 8 -> (B, 128, H/8, W/8)
>>> x_hat = model.decode(z)    # (B, 3, H, W) in [0, 1]; model(images) -> VAEOutput

Encoder and decoder are each a **linear patch path** (8x8 patches -> whitened coefficients,
:class:`~hrm_vision.patches.PatchWhitening` -> a learnable 1x1 convolution; with a fitted basis an
untrained model is patch PCA at its rate) plus **nonlinear stages** (PixelUnshuffle down,
residual blocks, PixelShuffle up) whose last convolution starts at zero. Only ``Conv2d``, ``ReLU``,
``PixelShuffle``/``PixelUnshuffle``, additions and ``Clip`` (clean ONNX/TensorRT export).
``init_from_data`` sets the rate (bits per pixel); reconstructions are clamped to [0, 1]
(straight-through while training). ``docs/models.md`` has the measurements behind the design.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .patches import PATCH, PatchWhitening, fit_patch_pca, water_filling_variances

DOWNSAMPLE_FACTOR = 8  #: the latent grid is this many times smaller than the image, each way
LOGVAR_INIT = -4.0  #: initial bias of the log-variance head
BITS_PER_PIXEL = 6.0  #: rate budget of a fresh patch model and the KL floor's default
MAX_BITS_PER_PIXEL = 24.0  #: 8-bit RGB: a code spending more is a copy of the image


# ---------------------------------------------------------------------- blocks
def conv(in_ch: int, out_ch: int, kernel: int = 3, bias: bool = True) -> nn.Conv2d:
    """A same-padded stride-1 convolution: ``(B, in_ch, H, W) -> (B, out_ch, H, W)``."""
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)


def zero_conv(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Conv2d:
    """A :func:`conv` whose weight and bias start at zero (the end of a residual branch)."""
    layer = conv(in_ch, out_ch, kernel)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` on ``(B, C, H, W)``; starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  zero_conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _pixel_blocks(x: Tensor, unshuffle: bool) -> Tensor:
    """PixelUnshuffle(2) (else PixelShuffle(2)) of a channels-last ``x`` with the channels in
    (row, column, channel) order instead of (channel, row, column): whole pixels are copied."""
    b, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1)
    y = (y.reshape(b, h // 2, 2, w // 2, 2 * c).transpose(2, 3).reshape(b, h // 2, w // 2, 4 * c)
         if unshuffle else
         y.reshape(b, h, w, 2, c // 2).transpose(2, 3).reshape(b, 2 * h, 2 * w, c // 4))
    return y.permute(0, 3, 1, 2)


class Shuffled(nn.Sequential):
    """A sequence that starts with PixelUnshuffle(2) and a convolution, or ends with a
    convolution and PixelShuffle(2). On channels-last tensors the rearrangement copies whole
    pixels (:func:`_pixel_blocks`, 3-9x faster in bf16) and the convolution's weight is
    permuted to match: the same map and parameters either way."""

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self)
        unshuffle = isinstance(mods[0], nn.PixelUnshuffle)
        head, pair, tail = ([], mods[:2], mods[2:]) if unshuffle else (mods[:-2], mods[-2:], [])
        for module in head:
            x = module(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = pair[1](pair[0](x))
        elif unshuffle:
            w, b = pair[1].weight.unflatten(1, (-1, 4)).transpose(1, 2).flatten(1, 2), pair[1].bias
            x = F.conv2d(_pixel_blocks(x, True), w, b, padding=pair[1].padding)
        else:
            w, b = (t.unflatten(0, (-1, 4)).transpose(0, 1).flatten(0, 1)
                    for t in (pair[0].weight, pair[0].bias))
            x = _pixel_blocks(F.conv2d(x, w, b, padding=pair[0].padding), False)
        for module in tail:
            x = module(x)
        return x


def down(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Sequential:
    """PixelUnshuffle (lossless), then a convolution: ``(B, in, H, W) -> (B, out, H/2, W/2)``."""
    return Shuffled(nn.PixelUnshuffle(2), conv(4 * in_ch, out_ch, kernel))


def up(in_ch: int, out_ch: int) -> nn.Sequential:
    """A 1x1 convolution, then PixelShuffle: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""
    return Shuffled(conv(in_ch, 4 * out_ch, kernel=1), nn.PixelShuffle(2))


# ---------------------------------------------------------------------- registry
#: Architecture names stored in checkpoints -> classes (the compact pair registers when
#: :mod:`hrm_vision.compact` is imported, which ``import hrm_vision`` does).
MODELS: dict[str, type[VAEBase]] = {}
_M = TypeVar("_M", bound="type[VAEBase]")


def register_model(name: str) -> Callable[[_M], _M]:
    """Class decorator: store the class in :data:`MODELS` under ``name``."""

    def deco(cls: _M) -> _M:
        MODELS[name] = cls
        return cls

    return deco


def model_name(model: VAEBase) -> str:
    """The registry name of a model instance (``"teacher"``, ``"tinyvae"``, ...)."""
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model: {sorted(MODELS)}")


def build_model(name: str, **arch: Any) -> VAEBase:
    """A registered model from its name and constructor arguments; ``ValueError`` naming the
    choices for an unknown name or argument."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](**arch)
    except TypeError as exc:
        raise ValueError(f"bad architecture arguments for {name!r}: {arch} ({exc})") from exc


@torch.no_grad()
def count_macs(model: VAEBase, height: int = 32, width: int = 32, part: str = "both") -> int:
    """Multiply-accumulates of convolutions and matmuls for one ``height x width`` image
    (``part``: encode/decode/both): PyTorch's ``FlopCounterMode`` FLOPs / 2."""
    if part not in ("encode", "decode", "both"):
        raise ValueError(f"part must be 'encode', 'decode' or 'both', got {part!r}")
    was_training = model.training
    model.eval()
    x = torch.rand(1, 3, height, width, device=next(model.parameters()).device)
    z = model.encode(x)
    counter = FlopCounterMode(display=False)
    with counter:
        if part in ("encode", "both"):
            model.encode(x)
        if part in ("decode", "both"):
            model.decode(z)
    model.train(was_training)
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------------- the shared API
class Posterior(NamedTuple):
    """Diagonal Gaussian posterior ``q(z|x)``, both tensors shaped like a latent."""

    mu: Tensor
    logvar: Tensor


class VAEOutput(NamedTuple):
    """``forward``'s result: ``reconstruction`` ``(B, 3, H, W)`` in [0, 1]; ``mu``, ``logvar``
    and ``z`` (a sample in training mode or with ``sample=True``, else ``mu``) like a latent."""

    reconstruction: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


def image_size_fits(height: int, width: int) -> bool:
    """Whether both sides are positive multiples of :data:`DOWNSAMPLE_FACTOR`."""
    return (height > 0 and width > 0 and height % DOWNSAMPLE_FACTOR == 0
            and width % DOWNSAMPLE_FACTOR == 0)


class _StraightThroughClamp(torch.autograd.Function):
    """``x.clamp(0, 1)`` forward, the identity's gradient backward (one pass over the images)."""

    forward = staticmethod(lambda ctx, x: x.clamp(0.0, 1.0))
    backward = staticmethod(lambda ctx, grad: grad)


class VAEBase(nn.Module):
    """A VAE whose subclasses build ``self.encoder`` (image -> ``2 * latent_dim`` channels: mu
    then logvar), ``self.decoder`` (latent -> image) and ``self._arch`` (constructor kwargs)."""

    in_channels: int = 3
    downsample_factor: int = DOWNSAMPLE_FACTOR
    #: logvar is clamped to this range so exp() stays finite in fp16/bf16.
    logvar_range: tuple[float, float] = (-30.0, 20.0)

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim
        self._arch: dict[str, Any] = {}

    def arch_config(self) -> dict[str, Any]:
        """Constructor keyword arguments: ``type(self)(**model.arch_config())`` rebuilds it."""
        return dict(self._arch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_shape(self, height: int = 32, width: int = 32) -> tuple[int, ...]:
        """``(latent_dim, H/8, W/8)`` for an image of the given size."""
        return (self.latent_dim, height // self.downsample_factor, width // self.downsample_factor)

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) (NCHW), got a tensor of rank {x.dim()} "
                f"with shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}; "
                             "convert uint8 frames with x.float() / 255")
        if x.shape[1] != self.in_channels:
            kind = "1 grey channel" if self.in_channels == 1 else f"{self.in_channels} RGB channels"
            raise ValueError(f"expected {kind} in dimension 1 (NCHW), got shape "
                             f"{tuple(x.shape)}; channels-last input needs x.permute(0, 3, 1, 2)")
        if not image_size_fits(x.shape[2], x.shape[3]):
            raise ValueError(f"image height and width must be divisible by "
                             f"{self.downsample_factor}, got {x.shape[2]}x{x.shape[3]}; "
                             "resize or crop the input")

    def _check_latent(self, z: Tensor) -> None:
        rank = 1 + len(self.latent_shape())  # 4, or 2 for one vector per image
        if not isinstance(z, Tensor) or z.dim() != rank or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"expected a latent of shape (B, {self.latent_dim}"
                             f"{', H/8, W/8' if rank == 4 else ''}), got {got}")
        if not z.is_floating_point():
            raise ValueError(f"expected a float latent, got dtype {z.dtype}")

    def init_from_data(self, images: Tensor, teacher: VAEBase | None = None,
                       bits_per_pixel: float = BITS_PER_PIXEL) -> None:
        """Fit data-dependent parameters to training images ``(N, 3, H, W)`` in [0, 1], or start
        in the coordinates of ``teacher``, the model distilled from (``CompactVAE`` does), with a
        posterior spending ``bits_per_pixel`` (the patch models)."""
        self._check_images(images)

    def posterior(self, x: Tensor) -> Posterior:
        """Posterior parameters of images ``x`` (B, 3, H, W) in [0, 1]."""
        self._check_images(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return Posterior(mu, logvar.clamp(*self.logvar_range))

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean ``(B, latent_dim, H/8, W/8)`` (never sampled): what
        :meth:`decode` takes."""
        return self.posterior(x).mu

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, 3, 8h, 8w)`` in [0, 1] from latents ``(B, latent_dim, h, w)``; clamped
        (with the identity's gradient while training)."""
        self._check_latent(z)
        x = self.decoder(z)
        if self.training and torch.is_grad_enabled():
            return _StraightThroughClamp.apply(x)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_sample(self, x: Tensor, seed: int = 0) -> Tensor:
        """``decode`` of one posterior sample per image of ``x`` (B, C, H, W) in [0, 1], drawn
        with its own generator seeded with ``seed``: what the model's rate buys."""
        mu, logvar = self.posterior(x)
        gen = torch.Generator(device=mu.device).manual_seed(seed)
        noise = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + torch.exp(0.5 * logvar) * noise)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """A sample ``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor, sample: bool | None = None) -> VAEOutput:
        """Encode, sample (``sample`` defaults to ``self.training``; else decode mu), decode."""
        mu, logvar = self.posterior(x)
        do_sample = self.training if sample is None else sample
        z = self.reparameterize(mu, logvar) if do_sample else mu
        return VAEOutput(self.decode(z), mu, logvar, z)


# ---------------------------------------------------------------------- the two VAEs
class Encoder(nn.Module):
    """Image ``(B, 3, H, W)`` in [0, 1] -> ``(B, 2 * latent_dim, H/8, W/8)``: ``mu =
    linear(patches(x)) + mu_head(h)``, ``logvar = logvar_head(h)``, ``h = stages(x)``."""

    def __init__(self, widths: list[int], latent_dim: int, blocks: int) -> None:
        super().__init__()
        self.patches = PatchWhitening()
        self.linear = conv(self.patches.dim, latent_dim, kernel=1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(latent_dim, self.patches.dim)[:, :, None, None])
        stages: list[nn.Module] = []
        for i, (prev, w) in enumerate(zip([3, *widths[:-1]], widths, strict=True)):
            # a 3x3 convolution first; stages after the third stay on the H/8 grid
            entry = down(prev, w, kernel=3 if i == 0 else 1) if i < 3 else conv(prev, w)
            stages.append(nn.Sequential(entry, *(ResBlock(w) for _ in range(blocks))))
        self.stages = nn.ModuleList(stages)  # the perceptual loss taps each stage
        self.mu_head = nn.Sequential(nn.ReLU(), zero_conv(widths[-1], latent_dim))
        self.logvar_head = nn.Sequential(nn.ReLU(), zero_conv(widths[-1], latent_dim, kernel=1))
        nn.init.constant_(self.logvar_head[1].bias, LOGVAR_INIT)

    def forward(self, x: Tensor) -> Tensor:
        h = (x * 2.0).sub_(1.0)  # in place: one image-sized tensor fewer
        for stage in self.stages:
            h = stage(h)
        mu = self.linear(self.patches(x)) + self.mu_head(h)
        return torch.cat([mu, self.logvar_head(h)], dim=1)


class Decoder(nn.Module):
    """Latent ``(B, latent_dim, h, w)`` -> image ``(B, 3, 8h, 8w)`` (unclamped):
    ``patches(linear(z)) + out(stages(z))``, the stages mirroring the encoder's."""

    def __init__(self, widths: list[int], latent_dim: int, blocks: int) -> None:
        super().__init__()
        self.patches = PatchWhitening(inverse=True)
        self.linear = conv(latent_dim, self.patches.dim, kernel=1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.patches.dim, latent_dim)[:, :, None, None])
        rev = widths[::-1]
        stages: list[nn.Module] = []
        for i, (prev, w) in enumerate(zip([latent_dim, *rev[:-1]], rev, strict=True)):
            # the last two stages double the resolution, the others stay on the H/8 grid
            entry = up(prev, w) if i > 0 and i >= len(rev) - 2 else conv(prev, w)
            stages.append(nn.Sequential(entry, *(ResBlock(w) for _ in range(blocks))))
        self.stages = nn.Sequential(*stages)
        self.out = Shuffled(nn.ReLU(), zero_conv(widths[0], 12), nn.PixelShuffle(2))

    def forward(self, z: Tensor) -> Tensor:
        return self.patches(self.linear(z)) + self.out(self.stages(z))


class _PatchVAE(VAEBase):
    """Shared construction of both models (see the module docstring)."""

    def __init__(self, latent_dim: int, widths: list[int], blocks: int) -> None:
        super().__init__(latent_dim)
        if min(widths) < 1 or blocks < 1:
            raise ValueError(f"widths and blocks must be positive, got {widths}, {blocks}")
        self.encoder = Encoder(widths, latent_dim, blocks)
        self.decoder = Decoder(widths, latent_dim, blocks)

    @torch.no_grad()
    def init_from_data(self, images: Tensor, teacher: VAEBase | None = None,
                       bits_per_pixel: float = BITS_PER_PIXEL) -> None:
        """Fit the patch basis of both paths to the PCA of ``images`` (N, 3, H, W) in [0, 1] and
        make the linear path the reverse water-filling code of ``bits_per_pixel`` on them (once,
        on a fresh model): posterior variances ``s^2 = min(1, theta / lambda)``, both maps scaled
        by ``sqrt(1 - s^2)``, so the KL is the budget and a component it cannot pay for is 0."""
        self._check_images(images)
        if not 0 <= bits_per_pixel <= MAX_BITS_PER_PIXEL:
            raise ValueError(f"bits_per_pixel must be in [0, {MAX_BITS_PER_PIXEL}], "
                             f"got {bits_per_pixel}")
        mean, components, variances = fit_patch_pca(images.float().cpu(), PATCH)
        for part in (self.encoder.patches, self.decoder.patches):
            part.set_basis(mean, components, variances)
        eye = torch.eye(self.latent_dim, variances.numel())  # channel c keeps coefficient c
        var = water_filling_variances(eye @ variances, bits_per_pixel * PATCH**2 * math.log(2))
        scaled = eye * (1 - var).sqrt()[:, None]
        self.encoder.linear.weight.copy_(scaled[:, :, None, None])
        self.decoder.linear.weight.copy_(scaled.T[:, :, None, None])
        self.encoder.logvar_head[1].bias.copy_(var.log().to(self.encoder.logvar_head[1].bias))

    @torch.no_grad()
    def linear_path(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The linear paths as affine maps between a flattened 8x8 patch (PixelUnshuffle order) and
        the latent at its position: ``(enc_weight (L, 192), enc_bias (L,), dec_weight (192, L),
        dec_bias (192,))``."""
        ea, eb = self.encoder.patches.weight[:, :, 0, 0], self.encoder.patches.bias
        el = self.encoder.linear.weight[:, :, 0, 0]
        ds, db = self.decoder.patches.weight[:, :, 0, 0], self.decoder.patches.bias
        dl = self.decoder.linear.weight[:, :, 0, 0]
        return el @ ea, el @ eb, ds @ dl, db.clone()


@register_model("teacher")
class TeacherVAE(_PatchVAE):
    """The teacher (~10M parameters): stage widths ``base_channels * (1, 2, 4, 5)`` at 1/2,
    1/4, 1/8, 1/8 resolution, ``blocks_per_stage`` residual blocks each; a 4x4x512 latent for
    32x32 images."""

    def __init__(self, latent_dim: int = 512, base_channels: int = 64,
                 blocks_per_stage: int = 1) -> None:
        super().__init__(latent_dim, [base_channels * k for k in (1, 2, 4, 5)], blocks_per_stage)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels,
                      "blocks_per_stage": blocks_per_stage}


@register_model("tinyvae")
class MinimalVAE(_PatchVAE):
    """The TinyVAE student: 3 stages (widths ``base_channels * (1, 2, 4)``, one residual block
    each), latent ``(latent_dim, H/8, W/8)`` (4x4x128 for 32x32 images), ~1.2M parameters."""

    def __init__(self, latent_dim: int = 128, base_channels: int = 32) -> None:
        super().__init__(latent_dim, [base_channels * k for k in (1, 2, 4)], 1)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels}


#: Another name for the student.
TinyVAE = MinimalVAE


# ---------------------------------------------------------------------- the adapter
class LatentAdapter(nn.Module):
    """A linear map from student to teacher latents, trained and saved with the student
    (``hrm_vision.load(path, role="adapter")``): a 1x1 convolution ``(B, student_dim, h, w) ->
    (B, teacher_dim, h, w)``, or with ``vector=True`` (the compact models) a fully connected
    layer ``(B, student_dim) -> (B, teacher_dim)``."""

    def __init__(self, student_dim: int = 128, teacher_dim: int = 512,
                 vector: bool = False) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim, self.vector = student_dim, teacher_dim, vector
        self.proj: nn.Linear | nn.Conv2d = (nn.Linear(student_dim, teacher_dim) if vector
                                            else nn.Conv2d(student_dim, teacher_dim, 1))

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments (``vector`` only when set)."""
        arch: dict[str, Any] = {"student_dim": self.student_dim, "teacher_dim": self.teacher_dim}
        return {**arch, "vector": True} if self.vector else arch

    def forward(self, z: Tensor) -> Tensor:
        """Student latent (B, student_dim[, h, w]) -> teacher latent (B, teacher_dim[, h, w])."""
        return self.proj(z)

    @torch.no_grad()
    def fit(self, student_mu: Tensor, teacher_mu: Tensor, groups: Tensor | None = None) -> None:
        """Become the least-squares map (the best linear prediction) from ``student_mu`` (N,
        student_dim[, h, w]) to ``teacher_mu`` (N, teacher_dim[, h, w]), latents of one batch.

        ``groups`` (N,) ints, the photograph each image was cut from: each teacher number's
        prediction is shrunk towards its mean by the factor in [0, 1] that predicts best from
        the even ``groups`` to the odd and back, so a correlation that only some photographs
        hold is dropped rather than learned."""
        s, t = (m.double().movedim(1, -1).reshape(-1, m.shape[1]) for m in (student_mu, teacher_mu))
        if s.shape[0] <= s.shape[1]:
            raise ValueError(f"an adapter fit needs more latent vectors than numbers: {s.shape}")

        def solve(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # weight (S, T), means
            sm, tm = s[rows].mean(0), t[rows].mean(0)
            return torch.linalg.lstsq(s[rows] - sm, t[rows] - tm).solution, sm, tm

        weight = solve(slice(None))[0]
        if groups is not None:
            odd = (groups.to(s.device) % 2 == 1).repeat_interleave(s.shape[0] // len(groups))
            if min(int(odd.sum()), int((~odd).sum())) > s.shape[1]:
                covary, spread = s.new_zeros(t.shape[1]), s.new_zeros(t.shape[1])
                for fit_rows in (odd, ~odd):
                    w, sm, tm = solve(fit_rows)
                    pred = (s[~fit_rows] - sm) @ w
                    covary += (pred * (t[~fit_rows] - tm)).sum(0)
                    spread += pred.pow(2).sum(0)
                weight = weight * (covary / spread.clamp(min=1e-12)).clamp(0, 1)
        self.proj.weight.copy_(weight.T.reshape(self.proj.weight.shape))
        self.proj.bias.copy_(t.mean(0) - weight.T @ s.mean(0))

    def variance(self, var: Tensor) -> Tensor:
        """Per-channel variance of ``W z + b`` for ``z ~ N(mu, diag(var))`` (the diagonal of
        ``W diag(var) W^T``), in the layout of :meth:`forward`."""
        w2 = self.proj.weight.reshape(self.teacher_dim, self.student_dim).pow(2)
        if self.vector:
            return var @ w2.T
        return F.conv2d(var, w2[:, :, None, None])
