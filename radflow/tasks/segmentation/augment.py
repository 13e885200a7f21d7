"""Augmentation of segmentation batches: image and label map transformed together.

Spatial transforms move image and label alike: random flips along each spatial axis
(probability 0.5 per axis and patch), optional quarter turns in one plane, and with a
probability per patch a small rotation and scaling (one `affine_grid`, bilinear for the
image, nearest for the label, so the label stays a label map). Intensity transforms act
on the image only, drawn per patch and channel (MRI sequences vary independently):
radflow's own gamma, contrast, brightness and noise (`radflow.augment.augment_intensity`).

All of it is vectorised PyTorch on whatever device the batch is on, seeded by a
`torch.Generator` on that device; the patch loader (`patches.PatchLoader`) runs it in its
background thread on the CPU, or a training loop calls it on the GPU.

The defaults follow nnU-Net's in spirit (mirroring on all axes; rotation and scaling on
a fifth of the patches; gamma 0.7-1.5; contrast 0.75-1.25), not to the letter: nnU-Net
also blurs, simulates low resolution, and draws each intensity transform with a
probability, where radflow applies its intensity jitter to every patch. The affine
transform pads with each channel's minimum within the patch (the image's background
after z-scoring) and the label with 0, where nnU-Net samples a larger patch first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radflow.augment import _rotation_3d, _uniform, augment_intensity

__all__ = ["SegmentationAugmentSettings", "augment_segmentation_batch"]


@dataclass(frozen=True)
class SegmentationAugmentSettings:
    """What `augment_segmentation_batch` does. Spatial axes are numbered from 0 (the
    first axis after the channels)."""

    flip_axes: tuple[int, ...] | None = None  # None: every spatial axis
    rot90_plane: tuple[int, int] | None = None  # e.g. (1, 2): quarter turns in that plane
    affine_probability: float = 0.2  # of a patch being rotated and scaled
    rotation_deg: float = 15.0  # about each axis (3D) or in the plane (2D), uniform +-
    scale: tuple[float, float] = (0.85, 1.25)  # zoom factor, > 1 magnifies
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.1  # added, in z-score units
    noise_std: float = 0.05  # in z-score units
    enabled: bool = True


def _flip(x: torch.Tensor, y: torch.Tensor, axes, generator) -> tuple[torch.Tensor, ...]:
    """Each patch flipped along each of `axes` (spatial) with probability 0.5."""
    n = x.shape[0]
    draws = torch.rand(n, len(axes), generator=generator, device=x.device) < 0.5
    xs, ys = [], []
    for i, flips in enumerate(draws.tolist()):
        dims = [a for a, flip in zip(axes, flips, strict=True) if flip]
        xs.append(torch.flip(x[i], [1 + a for a in dims]) if dims else x[i])
        ys.append(torch.flip(y[i], dims) if dims else y[i])
    return torch.stack(xs), torch.stack(ys)


def _rot90(x: torch.Tensor, y: torch.Tensor, plane, generator) -> tuple[torch.Tensor, ...]:
    """Each patch turned by k quarter turns in `plane`, k uniform in 0..3."""
    a, b = plane
    if x.shape[2 + a] != x.shape[2 + b]:
        raise ValueError(
            f"rot90_plane {plane} needs equal patch sizes on those axes, got {tuple(x.shape[2:])}"
        )
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device)
    xs = [torch.rot90(x[i], k, (1 + a, 1 + b)) for i, k in enumerate(turns.tolist())]
    ys = [torch.rot90(y[i], k, (a, b)) for i, k in enumerate(turns.tolist())]
    return torch.stack(xs), torch.stack(ys)


def _affine(x: torch.Tensor, y: torch.Tensor, settings, generator) -> tuple[torch.Tensor, ...]:
    """Rotation and zoom about the patch centre, for the patches drawn by
    `affine_probability`; image bilinear (padded with its channels' minimum), label
    nearest (padded with 0)."""
    n, device, dims = x.shape[0], x.device, x.dim() - 2
    chosen = torch.rand(n, generator=generator, device=device) < settings.affine_probability
    max_rad = math.radians(settings.rotation_deg)
    if dims == 3:
        rotation = _rotation_3d(n, max_rad, generator, device)
    else:
        angle = _uniform(n, -max_rad, max_rad, generator, device)
        c, s = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([c, -s, s, c], 1).view(n, 2, 2)
    zoom = _uniform(n, *settings.scale, generator, device).view(n, 1, 1)
    if not chosen.any():
        return x, y
    index = chosen.nonzero().flatten()
    linear = (rotation / zoom)[index]
    theta = torch.cat([linear, torch.zeros(len(index), dims, 1, device=device)], 2)
    grid = F.affine_grid(theta.to(x.dtype), [len(index), 1, *x.shape[2:]], align_corners=False)
    spatial = tuple(range(2, x.dim()))
    low = x[index].amin(dim=spatial, keepdim=True)
    moved = F.grid_sample(x[index] - low, grid, mode="bilinear", align_corners=False) + low
    labels = y[index].unsqueeze(1).to(x.dtype)
    moved_labels = F.grid_sample(labels, grid, mode="nearest", align_corners=False)
    x, y = x.clone(), y.clone()
    x[index] = moved
    y[index] = moved_labels.squeeze(1).round().to(y.dtype)
    return x, y


def augment_segmentation_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: SegmentationAugmentSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of patches: images (N, C, *spatial) float, labels (N, *spatial)
    integers; returns new tensors of the same shapes and dtypes. `generator` lives on
    the batch's device and makes the result reproducible."""
    if not settings.enabled:
        return images, labels
    if labels.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be the images' {tuple(images.shape)} "
            "without the channel axis"
        )
    dims = images.dim() - 2
    axes = tuple(range(dims)) if settings.flip_axes is None else tuple(settings.flip_axes)
    if any(not 0 <= a < dims for a in axes):
        raise ValueError(f"flip_axes {axes} must be spatial axes 0..{dims - 1}")
    x, y = _flip(images, labels, axes, generator) if axes else (images, labels)
    if settings.rot90_plane is not None:
        x, y = _rot90(x, y, settings.rot90_plane, generator)
    if settings.affine_probability > 0:
        x, y = _affine(x, y, settings, generator)
    return augment_intensity(x, settings, generator, per_channel=True), y
