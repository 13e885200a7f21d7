"""A residual U-Net (Ronneberger et al. 2015; He et al. 2016) for 2D and 3D segmentation.

Written in the shape of `radflow.models.resnet` (torchvision's style): an encoder of
residual stages made by `_make_stage` from radflow's own `BasicBlock`, a decoder stage
that shows its skip concatenation in one line, one-line factories. The layout is
nnU-Net's residual-encoder U-Net (Isensee et al. 2024, "ResEnc"):

    stem      conv 3 -> norm -> act                      in_channels -> w0
    encoder   stage 0: blocks[0] BasicBlocks, stride 1   w0
              stage s: blocks[s] BasicBlocks, the first with stride 2 (a strided
                       convolution downsamples; its 1x1 projection shortcut too)
                                                         w_s = min(w0 * 2**s, max_width)
    decoder   per stage, deepest first: transposed conv (kernel 2, stride 2) to the
              skip's width, concatenation with the encoder's output at that
              resolution, one conv 3 -> norm -> act      -> w_s
    head      1x1(x1) convolution to n_classes logits (no activation)

Input (N, in_channels, *spatial) -> logits (N, n_classes, *spatial), the same spatial
size. Every spatial size must be divisible by `2 ** (n_stages - 1)` (the encoder halves
it n_stages - 1 times); `check_patch_size` says so with the sizes that would fit,
`round_patch_size` rounds, `pad_to_multiple` pads a tensor for the network and gives the
crop back. Isotropic strides only: radflow preprocesses to an isotropic target spacing
(BraTS is 1 mm isotropic); nnU-Net's anisotropic pooling is not offered.

Normalisation: instance normalisation by default (`norm="instance"`, affine), with leaky
ReLU (slope 0.01), as nnU-Net. A segmentation batch is two or so patches of one or two
cases, oversampled around lesions in training and tiled over the whole head at
inference: batch statistics of two patches are noisy, and running averages learned on
lesion-centred training patches describe neither the mostly-background windows of
inference nor another scanner's volume. Instance normalisation has no batch statistics
and no running averages, so a patch is normalised the same way in training and at
inference, whatever the batch size. `norm="batch"` (BatchNorm + ReLU, the classification
ResNet's blocks unchanged) is there for comparison and for larger batches.

The plain variant (`residual=False`, the residual ablation's control) is, as in
`radflow.models.resnet`, the same network with every identity addition of the encoder's
blocks removed and nothing else changed: the downsampling blocks keep their projection
as a parallel convolution, so both variants have the same modules and parameters; the
last normalisation of each residual branch starts at zero in the residual variant only
(each block starts as the identity). The decoder has no additions in either variant.

Deep supervision (nnU-Net's auxiliary losses at the decoder's lower resolutions) is
left out: one head, one loss. It helps nnU-Net's long schedules little on BraTS-sized
lesions and would make every caller (loss, training loop) handle a list of outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import fx, nn

from radflow.models.resnet import _CONV, BasicBlock, make_stage

__all__ = [
    "NORMS",
    "UNETS",
    "UNET_BLOCKS",
    "ResidualUNet",
    "build_unet",
    "check_patch_size",
    "pad_to_multiple",
    "patch_divisor",
    "round_patch_size",
    "unet10",
    "unet18",
    "unet34",
]

_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
NORMS = ("instance", "batch")
_LEAKY_SLOPE = 0.01  # nnU-Net's


def _norm_and_activation(norm: str, dims: int):
    """(norm_layer: planes -> module, activation: () -> module) for a `norm` choice."""
    if norm == "instance":
        instance = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        return partial(instance, affine=True), partial(nn.LeakyReLU, _LEAKY_SLOPE, inplace=True)
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims], partial(nn.ReLU, inplace=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ------------------------------------------------------------------ patch sizes
def patch_divisor(n_stages: int) -> int:
    """What every input size must be divisible by: 2 ** (n_stages - 1)."""
    return 2 ** (n_stages - 1)


def round_patch_size(
    patch_size: Sequence[int], n_stages: int, *, direction: str = "up"
) -> tuple[int, ...]:
    """`patch_size` rounded per axis to a multiple of `patch_divisor(n_stages)`,
    "up" or "down" (never below one divisor)."""
    divisor = patch_divisor(n_stages)
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    rounding = math.ceil if direction == "up" else math.floor
    return tuple(max(divisor, rounding(s / divisor) * divisor) for s in patch_size)


def check_patch_size(patch_size: Sequence[int], n_stages: int) -> tuple[int, ...]:
    """`patch_size` as a tuple if every axis is divisible by `patch_divisor(n_stages)`;
    otherwise a ValueError naming the sizes that would fit."""
    patch_size = tuple(int(s) for s in patch_size)
    divisor = patch_divisor(n_stages)
    if any(s < 1 or s % divisor for s in patch_size):
        raise ValueError(
            f"patch size {patch_size} does not fit a U-Net of {n_stages} stages: every "
            f"axis must be a multiple of {divisor} (the encoder halves it {n_stages - 1} "
            f"times); {round_patch_size(patch_size, n_stages)} (rounded up) or "
            f"{round_patch_size(patch_size, n_stages, direction='down')} (rounded down) fit"
        )
    return patch_size


def pad_to_multiple(
    x: torch.Tensor, divisor: int, *, value: float = 0.0
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of `x` (N, C, *spatial) at their far ends up to multiples of
    `divisor` with `value`; returns the padded tensor and the crop that undoes it:
    `model(padded)[crop]` has `x`'s spatial size (crop = (..., slice, slice, slice))."""
    spatial = x.shape[2:]
    missing = [-s % divisor for s in spatial]
    pad = [p for m in reversed(missing) for p in (0, m)]  # F.pad: last axis first
    padded = F.pad(x, pad, value=value) if any(missing) else x
    return padded, (Ellipsis, *(slice(0, s) for s in spatial))


@fx.wrap  # a leaf of the traced graph (tests trace the forward pass to count additions)
def _check_divisible(spatial: torch.Size, divisor: int) -> None:
    if any(s % divisor for s in spatial):
        raise ValueError(
            f"input spatial size {tuple(spatial)} is not divisible by {divisor}; pad it "
            "(radflow.models.unet.pad_to_multiple) or choose a patch size that is "
            "(check_patch_size, round_patch_size)"
        )


# ------------------------------------------------------------------ building blocks
class ConvNormAct(nn.Sequential):
    """conv 3 -> norm -> activation: the stem and each decoder stage's convolution."""

    def __init__(self, dims: int, in_planes: int, planes: int, norm_layer, activation):
        super().__init__(
            _CONV[dims](in_planes, planes, 3, padding=1, bias=False),
            norm_layer(planes),
            activation(),
        )


class UpStage(nn.Module):
    """One decoder stage: upsample the deeper map to the skip's width and size, join
    the skip, convolve."""

    def __init__(self, dims: int, in_planes: int, planes: int, norm_layer, activation):
        super().__init__()
        self.up = _TRANSPOSED_CONV[dims](in_planes, planes, 2, stride=2)
        self.conv = ConvNormAct(dims, 2 * planes, planes, norm_layer, activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class ResidualUNet(nn.Module):
    """Residual-encoder U-Net; see the module doc for the layout.

    `blocks_per_stage`: residual blocks in each encoder stage (its length is the number
    of stages; the deepest map is 2 ** (n_stages - 1) times smaller than the input).
    `base_width`: channels of the first stage, doubled per stage up to `max_width`.
    `norm`: "instance" (default; with leaky ReLU) or "batch" (with ReLU).
    `residual=False`: the plain variant (see the module doc).
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (1, 2, 2, 2, 2),
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        n_classes: int = 2,
        base_width: int = 16,
        max_width: int = 320,
        norm: str = "instance",
        residual: bool = True,
    ):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(blocks_per_stage) < 2 or min(blocks_per_stage) < 1:
            raise ValueError(
                f"blocks_per_stage needs at least two stages of at least one block, "
                f"got {tuple(blocks_per_stage)}"
            )
        self.dims = spatial_dims
        self.residual = residual
        self.n_stages = len(blocks_per_stage)
        self.divisor = patch_divisor(self.n_stages)
        self.norm_layer, self.activation = _norm_and_activation(norm, spatial_dims)
        widths = [min(base_width * 2**s, max_width) for s in range(self.n_stages)]
        self.widths = tuple(widths)

        self.stem = ConvNormAct(spatial_dims, in_channels, widths[0], *self._layers())
        self.in_planes = widths[0]
        self.encoder = nn.ModuleList(
            self._make_stage(width, blocks, stride=1 if s == 0 else 2)
            for s, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True))
        )
        self.decoder = nn.ModuleList(  # deepest first: the order of the forward pass
            UpStage(spatial_dims, widths[s + 1], widths[s], *self._layers())
            for s in reversed(range(self.n_stages - 1))
        )
        self.head = _CONV[spatial_dims](widths[0], n_classes, 1)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # He init for leaky ReLU, nnU-Net's (InitWeights_He(1e-2))
                nn.init.kaiming_normal_(m.weight, a=_LEAKY_SLOPE)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if residual:  # zero-init residual; never in the plain net (radflow.models.resnet)
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.last_norm().weight)

    def _layers(self):
        return self.norm_layer, self.activation

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = make_stage(BasicBlock, self.dims, self.in_planes, planes, blocks, stride=stride,
                           residual=self.residual, norm_layer=self.norm_layer,
                           activation=self.activation)  # fmt: skip
        self.in_planes = planes
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x.shape[2:], self.divisor)
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for up, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


#: config `model.depth` -> blocks per encoder stage: named, like the ResNets, after the
#: weighted layers of the encoder (stem + two per block: 11, 19, 41); 34's are the first
#: five stages of nnU-Net's ResEnc-M.
UNET_BLOCKS = {10: (1, 1, 1, 1, 1), 18: (1, 2, 2, 2, 2), 34: (1, 3, 4, 6, 6)}


def unet10(**kwargs) -> ResidualUNet:
    return ResidualUNet(UNET_BLOCKS[10], **kwargs)


def unet18(**kwargs) -> ResidualUNet:
    return ResidualUNet(UNET_BLOCKS[18], **kwargs)


def unet34(**kwargs) -> ResidualUNet:
    return ResidualUNet(UNET_BLOCKS[34], **kwargs)


UNETS = {10: unet10, 18: unet18, 34: unet34}


def build_unet(
    model, *, in_channels: int, n_classes: int, spatial_dims: int = 3, norm: str = "instance"
) -> ResidualUNet:
    """The U-Net of config `model:` (a `radflow.models.ModelSettings`): `depth` picks the
    encoder's blocks per stage (`UNET_BLOCKS`: 10, 18 or 34), `base_width` the first
    stage's channels, `residual` the variant. `pooling` and `dropout` are the
    classification head's and are not used.

    The schema's default width (64) is the classification ResNet's; a segmentation study
    sets `model.base_width: 16` or 32 (nnU-Net uses 32 on GPUs).
    """
    if model.depth not in UNETS:
        raise ValueError(
            f"model.depth must be one of {sorted(UNETS)} for the segmentation U-Net "
            f"(blocks per encoder stage {UNET_BLOCKS}), got {model.depth}"
        )
    return UNETS[model.depth](
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        n_classes=n_classes,
        base_width=model.base_width,
        norm=norm,
        residual=model.residual,
    )
