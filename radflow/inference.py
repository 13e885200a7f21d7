"""Inference: pick the device, rebuild a model from its checkpoint, run it over cases.

Shared by training (validation), prediction and Grad-CAM, so that every stage moves
tensors to the device, sets the memory format and autocasts the same way.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from radflow.data import BatchIterator
from radflow.models import ModelSettings


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device is {requested!r} but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}); set train.device: auto or cpu, or install a CUDA build"
        )
    return device


def load_model(
    checkpoint_path: str | os.PathLike,
    task,
    *,
    in_channels: int,
    spatial_dims: int,
    device: torch.device,
):
    """Rebuild a trained model from its checkpoint (weights only; no pickled code).

    The checkpoint stores the model settings as a plain dict (config `model:`); keys it
    lacks (checkpoints written before the key existed) take the schema's defaults.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = task.build_model(
        ModelSettings.from_config(checkpoint["settings"]["model"]),
        in_channels=in_channels,
        spatial_dims=spatial_dims,
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def predict_logits(
    model,
    images: np.ndarray,
    device: torch.device,
    batch_size: int,
    channels_last: bool = False,
    autocast_dtype=None,
) -> torch.Tensor:
    """Raw model outputs (on the CPU, float32) for an array of cases (N, C, *spatial)."""
    model.eval()
    logits = []
    dummy_targets = np.zeros(len(images), dtype=np.int64)
    loader = BatchIterator(
        images, dummy_targets, np.arange(len(images)), batch_size, pin_memory=device.type == "cuda"
    )
    for x, _ in loader:
        x = to_device(x, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits.append(model(x).float().cpu())
    return torch.cat(logits) if logits else torch.empty(0)


def memory_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last layout of images with `spatial_dims` axes (CUDA's fast one)."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch (N, C, *spatial) on `device` as float32, channels-last if asked (2D/3D)."""
    x = x.to(device, non_blocking=True).float()
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=memory_format(x.dim() - 2))
    return x
