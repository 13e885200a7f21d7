import pytest
import torch

from radflow.models.resnet import BasicBlock, build_resnet


@pytest.mark.parametrize("depth", [18, 34, 50])
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
        build_resnet(101)
