import operator

import numpy as np
import pytest
import torch
from torch import fx, nn

from radflow.gradients import weighted_layers
from radflow.models import ModelSettings
from radflow.models.resnet import BasicBlock
from radflow.models.unet import (
    UNET_BLOCKS,
    ResidualUNet,
    build_unet,
    check_patch_size,
    pad_to_multiple,
    round_patch_size,
    unet18,
)
from radflow.tasks.segmentation.loss import DiceCELoss


def _tiny(**kwargs) -> ResidualUNet:
    return ResidualUNet((1, 2, 1), base_width=4, **kwargs)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_logits_have_the_input_size_and_one_channel_per_class(dims, norm):
    model = _tiny(spatial_dims=dims, in_channels=2, n_classes=3, norm=norm)
    x = torch.randn(2, 2, *([12, 16, 8][:dims]))  # divisible by 2 ** (3 - 1)
    assert model(x).shape == (2, 3, *x.shape[2:])


@pytest.mark.parametrize("size", [(13, 17, 9), (16, 16, 16), (5, 2, 3)])
def test_padding_helper_fits_any_size_and_crops_back(size):
    model = _tiny(in_channels=1, n_classes=2)
    x = torch.randn(1, 1, *size)
    padded, crop = pad_to_multiple(x, model.divisor, value=-1.0)
    # the next multiple of 4 (2 ** (3 stages - 1)) per axis
    assert padded.shape[2:] == tuple(-(-s // 4) * 4 for s in size)
    torch.testing.assert_close(padded[crop], x)  # the original sits at the start
    if padded.shape != x.shape:
        assert (padded == -1).sum() == padded.numel() - x.numel()
    assert model(padded)[crop].shape == (1, 2, *size)


def test_patch_size_helpers_name_the_sizes_that_fit():
    assert round_patch_size((97, 96, 81), 5) == (112, 96, 96)
    assert round_patch_size((97, 96, 81), 5, direction="down") == (96, 96, 80)
    assert round_patch_size((5, 30), 5, direction="down") == (16, 16)  # never below one step
    assert check_patch_size([128, 128, 128], 5) == (128, 128, 128)
    with pytest.raises(ValueError, match=r"multiple of 16.*\(112, 96, 96\).*\(96, 96, 80\)"):
        check_patch_size((97, 96, 81), 5)
    with pytest.raises(ValueError, match="not divisible by 4.*pad_to_multiple"):
        _tiny()(torch.randn(1, 1, 12, 13, 12))


def _block_parameters(in_planes: int, planes: int, projection: bool) -> int:
    """Weights of a BasicBlock: two 3^3 convolutions and two affine norms (+ the 1x1
    projection and its norm)."""
    params = 27 * in_planes * planes + 27 * planes * planes + 4 * planes
    return params + (in_planes * planes + 2 * planes if projection else 0)


def test_default_network_has_the_documented_widths_and_size():
    model = unet18(in_channels=2, n_classes=4)  # BraTS-like: 2 sequences, 4 labels
    widths = (16, 32, 64, 128, 256)
    assert model.widths == widths and model.divisor == 16
    expected = 27 * 2 * 16 + 2 * 16  # stem conv + norm
    in_planes = 16
    for stage, (width, blocks) in enumerate(zip(widths, UNET_BLOCKS[18], strict=True)):
        expected += _block_parameters(in_planes, width, projection=stage > 0)
        expected += (blocks - 1) * _block_parameters(width, width, projection=False)
        in_planes = width
    for deep, width in zip(widths[:0:-1], widths[-2::-1], strict=True):
        expected += 8 * deep * width + width  # transposed conv 2^3 with bias
        expected += 27 * 2 * width * width + 2 * width  # conv of the joined maps + norm
    expected += 16 * 4 + 4  # head
    assert sum(p.numel() for p in model.parameters()) == expected == 9_812_372


def test_instance_norm_and_leaky_relu_by_default_batch_norm_and_relu_on_request():
    default, batch = _tiny(), _tiny(norm="batch")
    blocks = [m for m in default.modules() if isinstance(m, BasicBlock)]
    assert all(isinstance(b.bn1, nn.InstanceNorm3d) and b.bn1.affine for b in blocks)
    assert all(isinstance(b.relu, nn.LeakyReLU) for b in blocks)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in default.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in batch.modules())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in batch.modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        _tiny(norm="group")


def test_instance_norm_makes_a_patch_independent_of_its_batch():
    model = _tiny(in_channels=1).train()
    a, b = torch.randn(1, 1, 8, 8, 8), 5 * torch.randn(1, 1, 8, 8, 8) + 3
    with torch.no_grad():
        alone = model(a)
        together = model(torch.cat([a, b]))[:1]
        model.eval()
        evaluated = model(a)
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(evaluated, alone)  # no running statistics: train == eval


def _additions(model: nn.Module) -> int:
    graph = fx.symbolic_trace(model).graph
    return sum(
        node.op == "call_function" and node.target in (operator.add, operator.iadd)
        for node in graph.nodes
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_plain_variant_is_the_residual_unet_minus_its_identity_additions(dims):
    torch.manual_seed(0)
    residual = ResidualUNet((1, 2, 2), spatial_dims=dims, base_width=4)
    plain = ResidualUNet((1, 2, 2), spatial_dims=dims, base_width=4, residual=False)
    assert [(n, type(m)) for n, m in residual.named_modules()] == [
        (n, type(m)) for n, m in plain.named_modules()
    ]
    assert {n: p.shape for n, p in residual.state_dict().items()} == {
        n: p.shape for n, p in plain.state_dict().items()
    }
    blocks = [m for m in residual.modules() if isinstance(m, BasicBlock)]
    projections = sum(b.downsample is not None for b in blocks)
    assert len(blocks) == 5 and projections == 2  # one per downsampling stage
    assert _additions(residual) - _additions(plain) == len(blocks) - projections
    assert _additions(plain) == projections  # the projections' sums; none in the decoder
    x = torch.randn(2, 1, *([8] * dims))
    assert plain(x).shape == residual(x).shape == (2, 2, *([8] * dims))


def test_plain_block_with_instance_norm_drops_only_the_identity():
    torch.manual_seed(1)
    norm = lambda planes: nn.InstanceNorm3d(planes, affine=True)  # noqa: E731
    x = torch.randn(1, 4, 6, 6, 6)
    for residual in (True, False):
        block = BasicBlock(3, 4, 4, residual=residual, norm_layer=norm,
                           activation=lambda: nn.LeakyReLU(0.01)).eval()  # fmt: skip
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        expected = branch + x if residual else branch
        torch.testing.assert_close(block(x), nn.functional.leaky_relu(expected, 0.01))


def test_residual_blocks_start_as_identity_plain_ones_do_not():
    for residual, weight in ((True, 0.0), (False, 1.0)):
        for block in (m for m in _tiny(residual=residual).modules() if isinstance(m, BasicBlock)):
            assert torch.all(block.last_norm().weight == weight)


def test_gradient_recorder_sees_the_projections_and_the_forward_order():
    layers = weighted_layers(_tiny())
    assert layers[0].name == "stem.0" and layers[-1].name == "head"
    assert [layer.name for layer in layers if layer.path == "projection"] == [
        "encoder.1.0.downsample.0",
        "encoder.2.0.downsample.0",
    ]
    assert layers.index(next(x for x in layers if x.name.startswith("decoder.0"))) > layers.index(
        next(x for x in layers if x.name.startswith("encoder.2"))
    )


def test_builder_takes_the_model_settings():
    model = build_unet(
        ModelSettings(depth=34, base_width=8, residual=False), in_channels=2, n_classes=3
    )
    assert [len(stage) for stage in model.encoder] == list(UNET_BLOCKS[34])
    assert model.widths == (8, 16, 32, 64, 128) and not model.residual
    assert model.stem[0].in_channels == 2 and model.head.out_channels == 3
    flat = build_unet(ModelSettings(depth=10, base_width=4), in_channels=1, n_classes=2,
                      spatial_dims=2)  # fmt: skip
    assert isinstance(flat.head, nn.Conv2d) and flat.residual
    with pytest.raises(ValueError, match="model.depth must be one of \\[10, 18, 34\\]"):
        build_unet(ModelSettings(depth=50), in_channels=1, n_classes=2)


def _spheres(n_cases: int, size: int, seed: int):
    """Two-channel volumes with one bright sphere each (noisy), and its label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    images, labels = [], []
    for _ in range(n_cases):
        centre, radius = rng.uniform(size / 3, 2 * size / 3, 3), rng.uniform(size / 6, size / 3.5)
        label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.int64)
        noise = rng.normal(0, 0.4, (2, *label.shape))
        images.append(np.stack([label, 0.5 * label]) + noise)
        labels.append(label)
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(np.stack(labels))


def test_unet_learns_to_segment_spheres():
    torch.manual_seed(0)
    x, y = _spheres(2, 16, seed=0)
    model = ResidualUNet((1, 1, 1), in_channels=2, n_classes=2, base_width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss()
    dice = 0.0
    for step in range(80):
        model.train()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 4:
            model.eval()
            with torch.no_grad():
                predicted = model(x).argmax(1) == 1
            truth = y == 1
            dice = (2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())).item()
            if dice > 0.9:
                break
    assert dice > 0.9, f"Dice {dice:.3f} after {step + 1} steps"
