"""Dice + cross-entropy, the segmentation loss of nnU-Net (its DC_and_CE / DC_and_BCE).

    loss = lambda_dice * (1 - soft Dice) + lambda_ce * cross-entropy

on logits (N, K, *spatial) against integer label maps (N, *spatial). Two ways to read
the K channels:

* classes (default): K mutually exclusive classes, label values 0..K-1, softmax; the
  cross-entropy is the multi-class one and the Dice is averaged over the foreground
  classes 1..K-1 (nnU-Net's do_bg=False; `include_background=True` adds class 0);
* regions (`regions=[[1, 2, 3], [2, 3], [3]]`, BraTS' whole tumour, tumour core,
  enhancing tumour): channel r is the binary map "label is in regions[r]", the regions
  may overlap, each channel is a sigmoid; the cross-entropy is the binary one averaged
  over channels and voxels, and the Dice is averaged over all region channels (there is
  no background channel). This is nnU-Net's region-based training.

Soft Dice per channel: (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), summed over
the spatial axes of each case, or over the batch and spatial axes together with
`batch_dice=True` (the default here). Batch Dice is the choice for small batches of
patches: a patch without a class (most random patches lack the enhancing tumour) gives
a per-case Dice of about 0 whatever the prediction, a constant push towards predicting
nothing; summed over the batch, the class is scored where it occurs. nnU-Net sets
`batch_dice` per configuration in its plans.

Differences from nnU-Net: the Dice term is reported as 1 - Dice (0 for a perfect
prediction) rather than -Dice (-1), which changes the value by a constant and not the
gradient; the loss is computed in float32 whatever the autocast dtype of the logits.

`ignore_index`: voxels with this label (e.g. the padding of a patch that leaves the
volume, if the sampler pads labels with it) count neither in the cross-entropy nor in
the Dice sums.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiceCELoss", "dice_ce_loss", "region_targets", "soft_dice"]


def soft_dice(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_dice: bool = True,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice per channel: (C,) with `batch_dice`, else (N, C).

    probabilities, targets: (N, C, *spatial), targets 0/1 (or soft), the same dtype.
    """
    axes = tuple(range(2, probabilities.dim()))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probabilities * targets).sum(axes)
    total = probabilities.sum(axes) + targets.sum(axes)
    return (2 * intersection + smooth) / (total + smooth).clamp_min(1e-8)


def region_targets(labels: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Integer labels (N, *spatial) -> float region maps (N, R, *spatial): channel r is 1
    where the label is one of regions[r]."""
    return torch.stack(
        [torch.isin(labels, torch.as_tensor(list(r), device=labels.device)) for r in regions],
        dim=1,
    ).float()


def dice_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    include_background: bool = False,
    batch_dice: bool = True,
    smooth: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    ignore_index: int | None = None,
    regions: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """lambda_dice * (1 - mean soft Dice) + lambda_ce * cross-entropy, a scalar.

    logits: (N, K, *spatial), any float dtype; labels: (N, *spatial) integers (0..K-1
    for classes; label values for regions). See the module doc for the options.
    """
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be the logits' {tuple(logits.shape)} "
            "without the channel axis"
        )
    logits = logits.float()
    labels = labels.long()
    keep = None if ignore_index is None else labels != ignore_index
    if keep is not None:
        labels = labels.masked_fill(~keep, 0)  # a valid index; masked out below

    if regions is None:
        targets = torch.zeros_like(logits).scatter_(1, labels.unsqueeze(1), 1.0)
        probabilities = logits.softmax(1)
        ce = F.cross_entropy(
            logits, labels if keep is None else labels.masked_fill(~keep, -100)
        )  # -100: cross_entropy's default ignore_index
    else:
        if len(regions) != logits.shape[1]:
            raise ValueError(f"{len(regions)} regions but {logits.shape[1]} output channels")
        targets = region_targets(labels, regions)
        probabilities = logits.sigmoid()
        weight = None if keep is None else keep.unsqueeze(1).expand_as(logits).float()
        ce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="sum")
        ce = ce / (weight.sum().clamp_min(1) if weight is not None else logits.numel())

    if keep is not None:
        mask = keep.unsqueeze(1).to(probabilities.dtype)
        probabilities, targets = probabilities * mask, targets * mask
    if regions is None and not include_background:
        probabilities, targets = probabilities[:, 1:], targets[:, 1:]
    dice = soft_dice(probabilities, targets, batch_dice=batch_dice, smooth=smooth)
    return lambda_dice * (1 - dice.mean()) + lambda_ce * ce


class DiceCELoss(nn.Module):
    """`dice_ce_loss` with its keyword options fixed (the same names and defaults):
    `DiceCELoss(regions=[[1, 2, 3], [2, 3], [3]])(logits, labels)` -> scalar."""

    def __init__(self, **options):
        super().__init__()
        inspect.signature(dice_ce_loss).bind(None, None, **options)  # unknown names fail here
        self.options = options

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
