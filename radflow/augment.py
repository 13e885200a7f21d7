"""Batch augmentation that runs on the training device, vectorised over the batch.

Radiograph-appropriate defaults: small rotations, zooms and shifts (patient positioning),
brightness/contrast/gamma jitter (exposure and vendor processing), Gaussian noise
(quantum noise). No horizontal flip by default: it swaps the heart's side, producing
images that never occur (situs inversus aside); enable it for tasks where laterality is
meaningless. Doing this on whole batches with one `grid_sample` keeps the data loader a
plain index-and-copy, so training is never loader-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from radflow.config import check_keys, schema_defaults

_DEFAULTS = schema_defaults("train", "augment")  # config/schema.yaml holds every default


@dataclass(frozen=True)
class AugmentSettings:
    """Config `train.augment:`; every default is the schema's (config/schema.yaml)."""

    rotation_deg: float = _DEFAULTS["rotation_deg"]
    scale: tuple[float, float] = _DEFAULTS["scale"]
    translate_fraction: float = _DEFAULTS["translate_fraction"]
    hflip_probability: float = _DEFAULTS["hflip_probability"]
    brightness: float = _DEFAULTS["brightness"]  # normalised units: 0.1 = a tenth of [0, 1]
    contrast: tuple[float, float] = _DEFAULTS["contrast"]
    gamma: tuple[float, float] = _DEFAULTS["gamma"]
    noise_std: float = _DEFAULTS["noise_std"]
    enabled: bool = _DEFAULTS["enabled"]

    @classmethod
    def from_config(cls, cfg: dict) -> AugmentSettings:
        """From config `train.augment:`; missing keys take the schema's defaults."""
        check_keys(cls, cfg, "train.augment")
        kwargs = {}
        for key, value in cfg.items():
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _rotation_3d(n: int, max_rad: float, generator, device) -> torch.Tensor:
    """(n, 3, 3) rotations, each the product of rotations about the three axes by angles
    drawn uniformly in [-max_rad, max_rad]."""
    angles = _uniform(3 * n, -1, 1, generator, device).view(n, 3) * max_rad
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    return rz.view(n, 3, 3) @ ry.view(n, 3, 3) @ rx.view(n, 3, 3)


def _spatial_theta(x: torch.Tensor, settings: AugmentSettings, generator) -> torch.Tensor:
    """The affine_grid matrices (B, 2, 3) or (B, 3, 4) of one batch: rotation, zoom,
    shift and flip of the last (left-right) axis."""
    n, device = x.shape[0], x.device
    if x.dim() == 4:
        angle = _uniform(n, -1, 1, generator, device) * math.radians(settings.rotation_deg)
        zoom = _uniform(n, *settings.scale, generator, device)
        shift = _uniform(2 * n, -1, 1, generator, device).view(n, 2)
        shift = shift * settings.translate_fraction * 2
        flip = torch.where(
            torch.rand(n, generator=generator, device=device) < settings.hflip_probability,
            -1.0,
            1.0,
        )
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                torch.stack([sin * flip, cos, shift[:, 1]], 1),
            ],
            1,
        )
    rotation = _rotation_3d(n, math.radians(settings.rotation_deg), generator, device)
    zoom = _uniform(n, *settings.scale, generator, device).view(n, 1, 1)
    shift = _uniform(3 * n, -1, 1, generator, device).view(n, 3, 1)
    flip = torch.where(
        torch.rand(n, generator=generator, device=device) < settings.hflip_probability, -1.0, 1.0
    )
    linear = rotation / zoom
    linear[:, :, 0] = linear[:, :, 0] * flip.view(n, 1)  # grid x = the last (W) axis
    return torch.cat([linear, shift * settings.translate_fraction * 2], dim=2)


def augment_batch(
    x: torch.Tensor, settings: AugmentSettings, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch of normalised images (any intensity scale): 2D (B, C, H, W) or 3D
    (B, C, D, H, W). 3D batches rotate about all three axes by up to `rotation_deg`,
    with the same zoom, shift, flip and intensity transforms as 2D.

    `generator` must live on x's device; it makes the augmentation reproducible.
    Spatial and intensity transforms are drawn independently per image.
    """
    if not settings.enabled:
        return x
    if x.dim() not in (4, 5):
        raise ValueError(f"augment_batch takes (B, C, H, W) or (B, C, D, H, W), got {x.dim()}D")
    theta = _spatial_theta(x, settings, generator).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with each image's own background (its minimum), whatever the intensity scale
    dims = tuple(range(1, x.dim()))
    low = x.amin(dim=dims, keepdim=True)
    high = x.amax(dim=dims, keepdim=True)
    out = (
        F.grid_sample(x - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + low
    )
    return augment_intensity(out, settings, generator, low=low, high=high)


class IntensitySettings(Protocol):
    """What `augment_intensity` reads: `AugmentSettings` has it, and so has the
    segmentation task's (radflow.tasks.segmentation.augment)."""

    gamma: tuple[float, float]
    contrast: tuple[float, float]
    brightness: float
    noise_std: float


def augment_intensity(
    x: torch.Tensor,
    settings: IntensitySettings,
    generator: torch.Generator,
    *,
    per_channel: bool = False,
    low: torch.Tensor | None = None,
    high: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intensity jitter of a batch (B, C, *spatial), drawn independently per image (per
    image and channel with `per_channel`, for multi-modal inputs such as MRI sequences):
    a gamma in `settings.gamma` (log-uniform) on the image's own [low, high] range (its
    minimum and maximum unless given), contrast about the mean by a factor in
    `settings.contrast`, an added brightness in +-`settings.brightness`, Gaussian noise
    of std `settings.noise_std`. Normalised units; z-scored images survive the gamma
    because it acts on their range.
    """
    gamma, contrast = settings.gamma, settings.contrast
    brightness, noise_std = settings.brightness, settings.noise_std
    n, channels, device = x.shape[0], x.shape[1], x.device
    dims = tuple(range(2 if per_channel else 1, x.dim()))
    draws = n * channels if per_channel else n
    view = (n, channels if per_channel else 1) + (1,) * (x.dim() - 2)
    if low is None:
        low = x.amin(dim=dims, keepdim=True)
    if high is None:
        high = x.amax(dim=dims, keepdim=True)
    # gamma acts on the image's own [min, max] range, so z-scored (MR) images survive it
    factor = torch.exp(_uniform(draws, *map(math.log, gamma), generator, device)).view(view)
    span = (high - low).clamp_min(1e-6)
    out = ((x - low) / span).clamp(0, 1) ** factor.to(x.dtype) * span + low
    mean = out.mean(dim=dims, keepdim=True)
    scale = _uniform(draws, *contrast, generator, device).view(view).to(out.dtype)
    shift = _uniform(draws, -brightness, brightness, generator, device)
    out = (out - mean) * scale + mean + shift.view(view).to(out.dtype)
    if noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype)
        out = out + noise * noise_std
    return out
