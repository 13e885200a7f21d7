"""Residual networks (He et al. 2016) for 2D and 3D single- or multi-channel images.

Written in the shape of torchvision's `models/resnet.py`: a block shows its identity
path in one line, a network is assembled by `_make_layer`, variants are one-line factory
functions. Differences, each for medical images:
- `spatial_dims` picks Conv2d/Conv3d, so the same code serves radiographs and volumes;
- `in_channels` defaults to 1 (grey-level images; no ImageNet RGB replication);
- `base_width` scales every stage (64 is the paper's width; 32 trains 3-4x faster on a
  CPU and is ample for small cohorts);
- `pooling` chooses the global pooling before the classifier: "avg" (the paper's),
  "max", or "avgmax" (both, concatenated). Max pooling suits "is there a lesion
  anywhere" labels, where a small finding would be averaged away (weakly supervised
  chest X-ray work uses max or log-sum-exp pooling for this reason);
- the last BatchNorm of each residual branch starts at zero ("zero-init residual"), so
  each block starts as the identity, which makes training from scratch on small data
  stable;
- depth 10 ([1, 1, 1, 1] basic blocks) and the paper's 18, 34, 50, 101 and 152.

The blocks take torchvision's `norm_layer` (a callable planes -> module; BatchNorm when
None) and an `activation` factory (ReLU when None), so other networks reuse them with
instance normalisation and leaky ReLU (the segmentation U-Net, `radflow.models.unet`);
the attribute names (`bn1`, `relu`) stay torchvision's whatever the layer.

The plain variant (`residual=False`, the ablation's control) is the same network with
every identity addition removed and nothing else changed:
- a block whose shortcut is the identity computes relu(F(x)) instead of relu(F(x) + x);
- a downsampling block's projection shortcut P(x) = BN(W_s x) (1x1 convolution with the
  block's stride) is a learned convolution, not an identity: the plain net keeps it as a
  plain convolutional branch of the same shape, y = relu(F(x) + P(x)). So the plain net
  has exactly the residual net's modules and parameters (0 parameters difference), and
  the comparison isolates the identity path. He et al. (2016) drop the projection from
  their plain nets; theirs have `projection_parameters(model)` fewer parameters (3
  projections; ResNet-18 width 64, 2D: 173,824 of 11.2 M). The branch is one
  convolution, so in three places (the stage transitions) a plain net's gradient has a
  path one (basic) or two (bottleneck) convolutions shorter than the main path;
- zero-init of the last BatchNorm of each branch is not used in the plain net: with no
  identity to carry the signal it would zero every block's output (and so every gradient
  before the head); its last BatchNorm starts at one like every other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
POOLINGS = ("avg", "max", "avgmax")


def _join(branch: torch.Tensor, x: torch.Tensor, downsample, residual: bool) -> torch.Tensor:
    """A block's output before its last ReLU: the branch F(x) plus the shortcut, which
    is the projection P(x) where the block has one (both variants) and the identity x
    otherwise (the residual variant only)."""
    if downsample is not None:
        branch += downsample(x)
    elif residual:
        branch += x
    return branch


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        dims: int,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        activation: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        conv, norm = _CONV[dims], norm_layer or _NORM[dims]
        self.residual = residual
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.relu = activation() if activation else nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(_join(out, x, self.downsample, self.residual))

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        dims: int,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        activation: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        conv, norm = _CONV[dims], norm_layer or _NORM[dims]
        self.residual = residual
        self.conv1 = conv(in_planes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = activation() if activation else nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(_join(out, x, self.downsample, self.residual))

    def last_norm(self) -> nn.Module:
        return self.bn3


def make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    dims: int,
    in_planes: int,
    planes: int,
    blocks: int,
    *,
    stride: int = 1,
    residual: bool = True,
    norm_layer: Callable[[int], nn.Module] | None = None,
    activation: Callable[[], nn.Module] | None = None,
) -> nn.Sequential:
    """`blocks` blocks in sequence, in_planes -> planes * block.expansion channels: the
    first with `stride` and, where the shape changes, a projection shortcut (1x1
    convolution with that stride + norm, the `downsample`). torchvision's `_make_layer`,
    as a function that `ResNet` and the U-Net (`radflow.models.unet`) both build from."""
    norm = norm_layer or _NORM[dims]
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(
            _CONV[dims](in_planes, out_planes, 1, stride=stride, bias=False), norm(out_planes)
        )
    layers = [
        block(dims, in_planes, planes, stride, downsample, residual,
              norm_layer=norm_layer, activation=activation)
    ]  # fmt: skip
    layers += [
        block(dims, out_planes, planes, residual=residual,
              norm_layer=norm_layer, activation=activation)
        for _ in range(1, blocks)
    ]  # fmt: skip
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """Stem (7x7 conv stride 2 + max-pool), four residual stages, global pooling, linear.

    `residual=False` builds the plain variant (see the module doc).

    Input (B, in_channels, *spatial) -> logits (B, num_classes). `features` is the output
    of the last stage (B, 8*base_width*expansion, *spatial/32), used for Grad-CAM.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        base_width: int = 64,
        dropout: float = 0.0,
        pooling: str = "avg",
        residual: bool = True,
    ):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.dims = spatial_dims
        self.residual = residual
        self.in_planes = base_width
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        self.conv1 = conv(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = _MAXPOOL[spatial_dims](kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0])
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        pooled = base_width * 8 * block.expansion * (2 if pooling == "avgmax" else 1)
        self.fc = nn.Linear(pooled, num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if residual:  # zero-init residual; never in the plain net (see the module doc)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layer = make_stage(block, self.dims, self.in_planes, planes, blocks, stride=stride,
                           residual=self.residual)  # fmt: skip
        self.in_planes = planes * block.expansion
        return layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        flat = torch.flatten(features, 2)
        if self.pooling == "avg":
            pooled = flat.mean(2)
        elif self.pooling == "max":
            pooled = flat.amax(2)
        else:
            pooled = torch.cat([flat.mean(2), flat.amax(2)], 1)
        return self.fc(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet10(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


RESNETS = {10: resnet10, 18: resnet18, 34: resnet34, 50: resnet50, 101: resnet101, 152: resnet152}


def build_resnet(depth: int, **kwargs) -> ResNet:
    """ResNet of the given depth (10, 18, 34, 50, 101 or 152); kwargs as for `ResNet`
    (`residual=False`: the plain variant)."""
    if depth not in RESNETS:
        raise ValueError(f"model.depth must be one of {sorted(RESNETS)}, got {depth}")
    return RESNETS[depth](**kwargs)


def projection_parameters(model: ResNet) -> int:
    """Parameters of the projection shortcuts (1x1 convolution + BatchNorm of each
    downsampling block): what He et al.'s plain nets, which have none, lack beside this
    module's plain variant."""
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is not None
        for p in m.downsample.parameters()
    )
