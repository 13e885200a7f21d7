import operator

import pytest
import torch
from torch import fx, nn

from radflow.models.resnet import (
    RESNETS,
    BasicBlock,
    Bottleneck,
    build_resnet,
    projection_parameters,
)


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
@pytest.mark.parametrize("dims", [2, 3])
def test_resnet_shapes(depth, dims):
    model = build_resnet(depth, spatial_dims=dims, in_channels=1, num_classes=2, base_width=8)
    x = torch.randn(2, 1, *([32] * dims))
    assert model(x).shape == (2, 2)
    assert model.features(x).shape[2:] == (1,) * dims  # 32 / 32


def test_resnet18_matches_the_paper_size():
    # torchvision's resnet18 has 11,689,512 parameters (3 channels, 1000 classes); with one
    # input channel and two classes: minus 64*2*49 stem weights and 998*(512+1) head ones
    model = build_resnet(18, in_channels=1, num_classes=2, base_width=64)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 64 * 2 * 49 - 998 * 513


def test_residual_blocks_start_as_identity():
    block = build_resnet(18, base_width=8).layer1[0]
    assert isinstance(block, BasicBlock)
    block.eval()
    x = torch.rand(1, 8, 16, 16)  # non-negative, so relu(x + 0) == x
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("pooling,features", [("avg", 64), ("max", 64), ("avgmax", 128)])
def test_pooling_heads(pooling, features):
    model = build_resnet(18, base_width=8, pooling=pooling)
    assert model.fc.in_features == features
    feats = torch.zeros(1, 64, 2, 2)
    feats[0, 0, 1, 1] = 4.0
    expected = {"avg": 1.0, "max": 4.0, "avgmax": 1.0}[pooling]
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[1, 0] = 1.0
        assert model.head(feats)[0, 1].item() == pytest.approx(expected)


def test_bad_depth_names_the_key():
    with pytest.raises(ValueError, match="model.depth"):
        build_resnet(20)


def _weighted_layers(model: nn.Module) -> int:
    """Convolutions and linear layers on the main path (projections excluded)."""
    return sum(
        isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) and ".downsample." not in f".{n}."
        for n, m in model.named_modules()
    )


@pytest.mark.parametrize("depth", sorted(RESNETS))
def test_depth_counts_the_weighted_layers(depth):
    assert _weighted_layers(build_resnet(depth, base_width=4)) == depth


def _additions(model: nn.Module) -> int:
    """Tensor additions in the traced forward pass (the shortcuts' sums)."""
    graph = fx.symbolic_trace(model).graph
    return sum(
        node.op == "call_function" and node.target in (operator.add, operator.iadd)
        for node in graph.nodes
    )


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
@pytest.mark.parametrize("dims", [2, 3])
def test_plain_variant_is_the_residual_net_minus_its_identity_additions(depth, dims):
    torch.manual_seed(0)
    residual = build_resnet(depth, spatial_dims=dims, base_width=4)
    plain = build_resnet(depth, spatial_dims=dims, base_width=4, residual=False)
    # the same modules, in the same order, with the same parameter and buffer shapes
    assert [(n, type(m)) for n, m in residual.named_modules()] == [
        (n, type(m)) for n, m in plain.named_modules()
    ]
    assert {n: p.shape for n, p in residual.state_dict().items()} == {
        n: p.shape for n, p in plain.state_dict().items()
    }
    # ... and one addition fewer per block whose shortcut is the identity
    blocks = [m for m in residual.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    identity_blocks = sum(b.downsample is None for b in blocks)
    assert identity_blocks == len(blocks) - 4 + (depth < 50)  # layer1 of basic nets: none
    assert _additions(residual) - _additions(plain) == identity_blocks
    assert _additions(plain) == len(blocks) - identity_blocks  # the projections' sums
    x = torch.randn(2, 1, *([16] * dims))
    assert plain(x).shape == residual(x).shape == (2, 2)
    assert plain.features(x).shape == residual.features(x).shape


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
def test_plain_block_drops_the_identity_and_keeps_the_projection(block_cls):
    torch.manual_seed(1)
    planes = 4
    width = planes * block_cls.expansion
    x = torch.randn(1, width, 8, 8)
    for residual in (True, False):
        block = block_cls(2, width, planes, residual=residual).eval()
        branch = _pre_activation(block, x)
        expected = torch.relu(branch + x) if residual else torch.relu(branch)
        torch.testing.assert_close(block(x), expected)
    # a downsampling block sums its projection in both variants
    projection = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False),
                               nn.BatchNorm2d(2 * width))  # fmt: skip
    block = block_cls(2, width, 2 * planes, 2, projection, residual=False).eval()
    x = torch.randn(1, width, 8, 8)
    with torch.no_grad():
        block.downsample[1].weight.zero_()  # projection contributes nothing: relu(F(x))
        no_projection = block(x)
        block.downsample[1].bias.fill_(1.0)  # now it adds exactly 1 everywhere
        torch.testing.assert_close(block(x), torch.relu(_pre_activation(block, x) + 1))
        torch.testing.assert_close(no_projection, torch.relu(_pre_activation(block, x)))


def _pre_activation(block, x):
    if isinstance(block, BasicBlock):
        return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    out = block.relu(block.bn1(block.conv1(x)))
    return block.bn3(block.conv3(block.relu(block.bn2(block.conv2(out)))))


def test_plain_net_has_no_zero_init_and_its_signal_reaches_the_head():
    residual = build_resnet(34, base_width=8)
    plain = build_resnet(34, base_width=8, residual=False)
    for net, value in ((residual, 0.0), (plain, 1.0)):
        for m in net.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                assert torch.all(m.last_norm().weight == value)
    features = plain.features(torch.randn(4, 1, 64, 64))
    assert features.abs().sum() > 0


def test_projection_parameters_he_et_al_plain_nets_lack():
    # three projections (layer2..4): 1x1 convolutions and their BatchNorm (weight, bias)
    model = build_resnet(18, base_width=64)
    convs = 64 * 128 + 128 * 256 + 256 * 512
    assert projection_parameters(model) == convs + 2 * (128 + 256 + 512) == 173_824
    assert projection_parameters(build_resnet(18, base_width=64, residual=False)) == 173_824


def test_the_schema_offers_exactly_the_built_depths():
    import yaml

    from radflow.config import SCHEMA_PATH

    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    assert schema["model"]["properties"]["depth"]["enum"] == sorted(RESNETS)
    assert schema["ablation"]["properties"]["depths"]["items"]["enum"] == sorted(RESNETS)
