"""Model cost accounting (radflow.efficiency): FLOPs against a hand count, tensor bytes."""

import pytest
import torch
from torch import nn

from radflow.efficiency import (
    EFFICIENCY_COLUMNS,
    LiveTensorBytes,
    ModelSpec,
    flops_per_image,
    measure,
    model_specs,
)
from radflow.models import ModelSettings
from radflow.models.resnet import BasicBlock, Bottleneck
from radflow.tasks import get_task


def _conv_flops(c_in: int, c_out: int, k: int, dims: int, out_voxels: int) -> int:
    """2 x multiply-accumulates: 2 * Cin * Cout * k^d per output voxel."""
    return 2 * c_in * c_out * k**dims * out_voxels


@pytest.mark.parametrize("dims", [2, 3])
def test_flops_of_one_basic_block_match_a_hand_count(dims):
    size, c = 8, 6
    block = BasicBlock(dims, c, c)
    voxels = size**dims
    expected = 2 * _conv_flops(c, c, 3, dims, voxels)  # conv1, conv2; BN/ReLU/add: 0
    assert flops_per_image(block, (c, *[size] * dims)) == expected
    # a downsampling block: stride 2 in conv1, a 1x1 projection at the same stride
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    projection = nn.Sequential(conv(c, 2 * c, 1, stride=2, bias=False), norm(2 * c))
    down = BasicBlock(dims, c, 2 * c, 2, projection, residual=False)
    out_voxels = (size // 2) ** dims
    expected = (
        _conv_flops(c, 2 * c, 3, dims, out_voxels)
        + _conv_flops(2 * c, 2 * c, 3, dims, out_voxels)
        + _conv_flops(c, 2 * c, 1, dims, out_voxels)
    )
    assert flops_per_image(down, (c, *[size] * dims)) == expected


def test_flops_of_one_bottleneck_block_match_a_hand_count():
    block = Bottleneck(2, 16, 4)  # 16 -> 4 (1x1) -> 4 (3x3) -> 16 (1x1)
    voxels = 10 * 10
    expected = (
        _conv_flops(16, 4, 1, 2, voxels)
        + _conv_flops(4, 4, 3, 2, voxels)
        + _conv_flops(4, 16, 1, 2, voxels)
    )
    assert flops_per_image(block, (16, 10, 10)) == expected


def test_live_tensor_bytes_counts_storages_once_and_forgets_freed_ones():
    tracker = LiveTensorBytes()
    held = torch.ones(250)  # 1000 bytes, existing before
    tracker.hold([held, held[10:]])  # a view: the same storage
    with tracker:
        a = torch.ones(1000)  # +4000
        b = a * 2  # +4000: peak 9000
        del b  # freed
        c = a + 1  # +4000 again: still 9000
        c.add_(1)  # in place: same storage
        view = c[3:]  # a view: nothing new
    assert tracker.peak == 9000
    assert tracker.current == 9000
    del c
    assert tracker.current == 9000  # the view keeps the storage alive
    del view
    assert tracker.current == 5000


def test_a_row_per_model_with_equal_costs_for_the_two_variants():
    task = get_task("classification")
    base = ModelSettings(depth=10, base_width=4)
    specs = model_specs(base, [10], ["plain", "residual"])
    assert [s.name for s in specs] == ["plain10", "residual10"]
    rows = [
        measure(task, s, (1, 32, 32), batch_size=4, threads=1, repeats=1, min_seconds=0)
        for s in specs
    ]
    assert all(list(row) == list(EFFICIENCY_COLUMNS) for row in rows)
    plain, residual = rows
    # the same layers: the same parameters and counted FLOPs (additions are not counted)
    assert plain["parameters"] == residual["parameters"]
    assert plain["gflops_per_image"] == residual["gflops_per_image"] > 0
    model = task.build_model(base, in_channels=1, spatial_dims=2)
    assert residual["parameters"] == sum(p.numel() for p in model.parameters())
    # a training step holds weights, gradients, two AdamW moments and activations
    weights_mib = 4 * residual["parameters"] / 2**20
    assert residual["train_peak_mib"] > 4 * weights_mib
    assert residual["train_peak_mib"] > residual["infer_peak_mib"] > weights_mib
    assert residual["latency_ms"] > 0 and residual["train_images_per_s"] > 0
    assert ModelSpec(base).name == "residual10"
