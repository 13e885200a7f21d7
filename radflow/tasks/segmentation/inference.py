"""Whole-volume prediction by sliding windows: `predict_volume`.

A segmentation network is trained on patches and applied to a whole volume (BraTS:
240 x 240 x 155, or 160 x 192 x 160 after cropping) tile by tile. MONAI's
`sliding_window_inference` places windows of the training patch size with the given
overlap (0.5: each voxel in up to 2 windows per axis, 8 in 3D), the last one flush with
the far end, pads a volume smaller than a window with `background` and crops back, and
blends the windows' outputs with Gaussian weights (sigma = 0.125 x the window size per
axis, as nnU-Net), so a voxel's prediction comes mostly from the windows it is central
in, where the network saw the most context.

The weights are radflow's (`gaussian_weights`), handed to MONAI as its `roi_weight_map`:
MONAI's own Gaussian map is floored at 1e-3, which in 3D flattens every voxel more than
0.46 window widths from the window's centre (59% of a window) to one weight; where all
windows holding a voxel put it that far out (the volume's outer shell), they were
averaged equally, a window's zero-padded edge included (a 3^3 convolution: 0.18 off the
whole-volume output there, measured by tests/test_segmentation_inference.py). nnU-Net
floors only exact zeros; so does `gaussian_weights`.

Test-time mirroring (`mirror_axes`): every window is also predicted flipped along each
combination of the given spatial axes (all 2**k - 1 non-empty subsets, as nnU-Net), the
probabilities flipped back and averaged with the unflipped ones. It costs 2**k forward
passes per window (8 for three axes) and typically adds a little Dice.

Differences from nnU-Net: windows and mirrors are averaged as probabilities (softmax or
sigmoid first), where nnU-Net averages logits; averaging probabilities is the usual way
to ensemble and keeps every intermediate result in [0, 1]. The input is padded with
`background` only where it is smaller than a window (nnU-Net pads the same way).

Device and precision: the windows run on `device`; on CUDA with `mixed_precision` under
bf16 autocast (fp16 where the GPU lacks bf16) with the model and the windows in the
channels_last_3d memory format (3D), as the training stage does for 2D; the blended
probabilities are accumulated on that device and returned on the CPU as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import torch
from torch import nn

__all__ = ["gaussian_weights", "mirror_flips", "predict_volume"]

GAUSSIAN_SIGMA_SCALE = 0.125  # of the window size, per axis: nnU-Net's


def gaussian_weights(
    patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE
) -> torch.Tensor:
    """A window's blending weights (*patch_size) float32: the product over axes of
    exp(-d**2 / (2 sigma**2)), d the distance from the window's centre ((size - 1) / 2,
    so the map is symmetric under flips) and sigma = sigma_scale x size: 1 at the
    centre (between voxels for an even size), floored at the smallest normal float32
    instead of underflowing to 0. Only ratios matter: the blend divides by the sum."""
    weights = torch.ones(())
    for size in patch_size:
        distance = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        gauss = torch.exp(-(distance**2) / (2 * (sigma_scale * size) ** 2))
        weights = weights.unsqueeze(-1) * gauss
    return weights.float().clamp_min(torch.finfo(torch.float32).tiny)


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The spatial axis combinations test-time mirroring flips: every non-empty subset
    of `axes` (2**k - 1 of them), plus the unflipped window ()."""
    axes = tuple(sorted(set(axes)))
    return [combo for k in range(len(axes) + 1) for combo in combinations(axes, k)]


def _activation(name):
    if callable(name):  # a task's own (localisation: heatmap sigmoid, regressions as they are)
        return name
    if name == "softmax":
        return lambda logits: logits.float().softmax(1)
    if name == "sigmoid":
        return lambda logits: logits.float().sigmoid()
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {name!r}")


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    activation: str | Callable[[torch.Tensor], torch.Tensor] = "softmax",
    background: float = 0.0,
    sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
    device: torch.device | str = "cpu",
    mixed_precision: bool = True,
) -> torch.Tensor:
    """Class probabilities (K, *spatial) float32 on the CPU for one volume.

    model: maps (B, C, *patch) to logits (B, K, *patch); put in eval mode here (and, on
        CUDA, moved to `device` and to channels_last_3d: it is changed in place).
    image: (C, *spatial) array of any size and float dtype (a memory map is read once).
    patch_size: the window, usually the training patch size (each axis divisible as the
        network needs: radflow.models.unet.check_patch_size).
    overlap: fraction of a window shared with its neighbour along each axis.
    sw_batch_size: windows per forward pass.
    mirror_axes: spatial axes (0 = the first after the channels) for test-time
        mirroring; () for none, (0, 1, 2) for nnU-Net's full mirroring in 3D.
    activation: "softmax" (exclusive classes), "sigmoid" (overlapping regions), or a
        function of the logits giving the per-channel values to blend.
    background: the value padding a volume smaller than a window (0 for z-scored MRI).
    device, mixed_precision: see the module doc (mixed precision is used on CUDA only).
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if not torch.is_tensor(image):  # a copy: memory maps are read-only
        image = torch.from_numpy(np.array(image, dtype=np.float32))
    x = image.to(device=device, dtype=torch.float32).unsqueeze(0)
    dims = x.dim() - 2
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != dims:
        raise ValueError(f"patch size {patch_size} for a {dims}D volume {tuple(x.shape[2:])}")
    if any(not 0 <= a < dims for a in mirror_axes):
        raise ValueError(f"mirror_axes {tuple(mirror_axes)} must be spatial axes 0..{dims - 1}")
    channels_last = on_cuda and dims == 3
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    autocast_dtype = None
    if on_cuda and mixed_precision:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    to_probabilities = _activation(activation)
    flips = mirror_flips(mirror_axes)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        total = None
        for axes in flips:
            spatial = [2 + a for a in axes]
            flipped = torch.flip(windows, spatial) if axes else windows
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(flipped)
            probabilities = to_probabilities(logits)
            if axes:
                probabilities = torch.flip(probabilities, spatial)
            total = probabilities if total is None else total + probabilities
        return total / len(flips)

    probabilities = sliding_window_inference(
        x,
        roi_size=patch_size,
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",  # used by MONAI only where it ignores roi_weight_map: never here
        roi_weight_map=gaussian_weights(patch_size, sigma_scale).to(device),
        padding_mode="constant",
        cval=background,
        sw_device=device,
        device=device,
    )
    return torch.as_tensor(probabilities)[0].float().cpu()
