import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from radflow.tasks.segmentation.augment import (
    SegmentationAugmentSettings,
    augment_segmentation_batch,
)
from radflow.tasks.segmentation.patches import (
    PatchLoader,
    SegmentationCase,
    channel_minimum,
    draw_patches,
    foreground_locations,
    read_patch,
    sample_batch,
)

NO_INTENSITY = {"gamma": (1.0, 1.0), "contrast": (1.0, 1.0), "brightness": 0.0, "noise_std": 0.0}


def _coordinate_case(shape, dtype=np.float32, background=-1.0) -> SegmentationCase:
    """Image channels that are the voxel's coordinates (exact in float16 below 2048) and
    a label that is a function of them: any misplaced or misaligned voxel shows."""
    coords = np.indices(shape)
    label = (coords.sum(0) % 5).astype(np.uint8)
    return SegmentationCase(
        coords.astype(dtype), label, foreground_locations(label), background=background
    )


def _check_window(case, image, label, lower, label_pad):
    """Every voxel of a read window holds the volume's voxel at lower + offset, or the
    padding where that lies outside."""
    shape = case.label.shape
    position = np.indices(label.shape) + np.reshape(lower, (-1,) + (1,) * len(shape))
    inside = np.all((position >= 0) & (position < np.reshape(shape, (-1,) + (1,) * len(shape))),
                    axis=0)  # fmt: skip
    for axis in range(len(shape)):
        np.testing.assert_array_equal(image[axis][inside], position[axis][inside])
    expected_label = position.sum(0) % 5
    np.testing.assert_array_equal(label[inside], expected_label[inside])
    background = np.broadcast_to(case.background, (image.shape[0],))
    for channel in range(image.shape[0]):
        assert np.all(image[channel][~inside] == background[channel])
    assert np.all(label[~inside] == label_pad)
    return inside


@pytest.mark.parametrize("lower", [(-3, 5, 10), (0, 0, 0), (4, -2, -6), (10, 7, 12), (-20, 0, 0)])
def test_read_patch_pads_outside_the_volume_and_keeps_label_aligned(lower):
    case = _coordinate_case((12, 9, 14), dtype=np.float16, background=(-1.0, -2.0, -3.0))
    image, label = read_patch(case, lower, (8, 8, 8), label_pad=255)
    assert image.shape == (3, 8, 8, 8) and image.dtype == np.float32
    assert label.shape == (8, 8, 8) and label.dtype == np.int64
    inside = _check_window(case, image, label, lower, label_pad=255)
    expected_inside = np.prod(
        [max(0, min(lo + 8, s) - max(lo, 0)) for lo, s in zip(lower, (12, 9, 14), strict=True)]
    )
    assert inside.sum() == expected_inside


def test_volume_smaller_than_the_patch_is_padded_around_it():
    case = _coordinate_case((6, 20, 5))
    draws = draw_patches([case], (8, 8, 8), 16, np.random.default_rng(1))
    for draw in draws:  # overhanging both ends where the volume is smaller
        assert -2 <= draw.lower[0] <= 0 and 0 <= draw.lower[1] <= 12 and -3 <= draw.lower[2] <= 0
    images, labels = sample_batch([case], (8, 8, 8), 16, np.random.default_rng(1))
    assert images.shape == (16, 3, 8, 8, 8) and labels.shape == (16, 8, 8, 8)
    for draw, image, label in zip(draws, images, labels, strict=True):  # the same draws, read
        inside = _check_window(case, image, label, draw.lower, label_pad=0)
        assert inside.sum() == 6 * 8 * 5


def test_about_a_third_of_patches_hold_foreground():
    shape = (48, 48, 48)
    label = np.zeros(shape, np.uint8)
    label[24, 24, 24] = 1  # two single-voxel classes: random patches rarely hit them
    label[10, 40, 5] = 2
    case = SegmentationCase(np.zeros((1, *shape), np.float16), label, foreground_locations(label))
    rng = np.random.default_rng(7)
    draws = draw_patches([case], (8, 8, 8), 3000, rng)
    forced = [d for d in draws if d.foreground_class is not None]
    assert 0.31 < len(forced) / 3000 < 0.36  # 1/3 +- 3 standard deviations
    classes = np.array([d.foreground_class for d in forced])
    assert 0.4 < np.mean(classes == 1) < 0.6  # a random present class
    for draw in forced:
        voxel = case.class_locations[draw.foreground_class][0]
        assert all(lo <= v < lo + 8 for lo, v in zip(draw.lower, voxel, strict=True))
    # ... and the patches read hold the foreground about as often
    hits = 0
    for _ in range(60):
        _, labels = sample_batch([case], (8, 8, 8), 50, rng)
        hits += (labels.reshape(50, -1) > 0).any(1).sum()
    assert 0.31 < hits / 3000 < 0.38  # plus ~1% random patches that hit a voxel


def test_a_case_without_foreground_gets_random_patches():
    case = SegmentationCase(np.zeros((1, 10, 10, 10)), np.zeros((10, 10, 10), np.uint8))
    draws = draw_patches([case], (4, 4, 4), 50, np.random.default_rng(0), oversample_foreground=1)
    assert all(d.foreground_class is None for d in draws)


def test_foreground_patches_centre_their_voxel_unless_near_the_border():
    label = np.zeros((40, 40, 40), np.uint8)
    label[20, 21, 3] = 1
    case = SegmentationCase(np.zeros((1, 40, 40, 40)), label, foreground_locations(label))
    (draw,) = draw_patches([case], (16, 16, 16), 1, np.random.default_rng(0),
                           oversample_foreground=1)  # fmt: skip
    assert draw.lower == (12, 13, 0)  # centred on axes 0 and 1; shifted inside on axis 2


def test_foreground_locations_are_subsampled_like_nnunet():
    label = np.zeros((60, 60, 60), np.uint8)
    label[:30] = 1  # 108,000 voxels: 1% = 1,080 > max_per_class
    label[40:42, :10, :5] = 2  # 100 voxels
    label[50, 50, 50] = 3
    locations = foreground_locations(label, max_per_class=500, seed=3)
    assert sorted(locations) == [1, 2, 3]
    assert len(locations[1]) == 1080 and len(locations[2]) == 100 and len(locations[3]) == 1
    for cls, coords in locations.items():
        assert coords.shape[1] == 3 and coords.dtype == np.int32
        assert np.all(label[tuple(coords.T)] == cls)
        assert len(np.unique(coords, axis=0)) == len(coords)
    again = foreground_locations(label, max_per_class=500, seed=3)
    assert all(np.array_equal(locations[c], again[c]) for c in locations)
    assert foreground_locations(np.zeros((4, 4), np.uint8)) == {}


def test_channel_minimum_is_each_channels_background():
    image = np.stack([np.full((3, 3), 5.0), np.arange(9.0).reshape(3, 3) - 2])
    np.testing.assert_array_equal(channel_minimum(image), [5.0, -2.0])


def _resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_patches_of_a_memory_map_read_only_their_window(tmp_path):
    # 256 MiB of float16 image and 128 MiB of label, sparse files: no disk written
    shape = (512, 512, 512)
    for name, dtype, full in (("image", np.float16, (1, *shape)), ("label", np.uint8, shape)):
        np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", dtype, full).flush()
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    case = SegmentationCase(image, np.load(tmp_path / "label.npy", mmap_mode="r"))
    before = _resident_kib()
    images, _ = sample_batch([case], (32, 32, 32), 4, np.random.default_rng(0))
    grown_mib = (_resident_kib() - before) / 1024
    assert images.shape == (4, 1, 32, 32, 32)
    # ~5 MiB a patch: whole pages of 32 rows in 32 slices, and the kernel maps 64 KiB
    # around each page fault; the files are 384 MiB
    assert grown_mib < 38, f"reading 4 patches made {grown_mib:.0f} MiB resident"
    # the measure sees a read of a quarter of the file
    before = _resident_kib()
    float(np.asarray(image[0, :128]).astype(np.float32).sum())
    assert (_resident_kib() - before) / 1024 > 48


def test_sampling_is_deterministic_with_a_seed():
    case = _coordinate_case((20, 18, 16))
    first = sample_batch([case, case], (8, 8, 8), 4, np.random.default_rng(5))
    again = sample_batch([case, case], (8, 8, 8), 4, np.random.default_rng(5))
    other = sample_batch([case, case], (8, 8, 8), 4, np.random.default_rng(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def _loader(case, **kwargs) -> PatchLoader:
    return PatchLoader([case], (8, 8, 8), 2, 3, seed=11, **kwargs)


def test_loader_yields_a_fixed_number_of_reproducible_batches_per_epoch():
    case = _coordinate_case((20, 18, 16))
    settings = SegmentationAugmentSettings(affine_probability=0.5)
    loader, twin = _loader(case, augment=settings), _loader(case, augment=settings)
    epoch0 = list(loader)
    assert len(loader) == len(epoch0) == 3
    for x, y in epoch0:
        assert x.shape == (2, 3, 8, 8, 8) and x.dtype == torch.float32
        assert y.shape == (2, 8, 8, 8) and y.dtype == torch.int64
    for _ in twin:  # the twin stops its first epoch early: the second is the same
        break
    epoch1, twin1 = list(loader), list(twin)
    assert all(
        torch.equal(a, b)
        for pa, pb in zip(epoch1, twin1, strict=True)
        for a, b in zip(pa, pb, strict=True)
    )
    assert not torch.equal(epoch0[0][0], epoch1[0][0])


def test_stopping_an_epoch_early_leaves_no_thread_behind():
    case = _coordinate_case((20, 18, 16))
    before = threading.active_count()
    loader = PatchLoader([case], (8, 8, 8), 2, 100, seed=0, prefetch=1)
    for _ in loader:
        break
    assert threading.active_count() == before


def test_loader_errors_surface_in_the_training_thread():
    case = _coordinate_case((20, 18, 16))
    loader = PatchLoader([case], (8, 8), 2, 3, seed=0)  # 2D patch for a 3D case
    with pytest.raises(ValueError, match="patch size"):
        list(loader)


def test_flips_and_quarter_turns_move_image_and_label_together():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (8, 6, 6, 6), generator=generator)
    images = torch.stack([labels.float(), -labels.float()], 1)
    settings = SegmentationAugmentSettings(rot90_plane=(1, 2), affine_probability=0, **NO_INTENSITY)
    x, y = augment_segmentation_batch(images, labels, settings, generator)
    assert torch.equal(x[:, 0], y.float()) and torch.equal(x[:, 1], -y.float())
    assert not torch.equal(y, labels)  # something moved
    for original, moved in zip(labels, y, strict=True):  # by a symmetry of the cube: same histogram
        assert torch.equal(torch.bincount(original.flatten(), minlength=4),
                           torch.bincount(moved.flatten(), minlength=4))  # fmt: skip


def test_rotation_and_scaling_keep_labels_labels_and_aligned():
    generator = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    ball = ((grid - 7.5).square().sum(0) < 25).long() + ((grid - 7.5).square().sum(0) < 9)
    labels = ball.expand(4, -1, -1, -1).clone()
    images = labels.float().unsqueeze(1)
    settings = SegmentationAugmentSettings(
        flip_axes=(), affine_probability=1.0, rotation_deg=30, scale=(0.7, 0.8), **NO_INTENSITY
    )
    x, y = augment_segmentation_batch(images, labels, settings, generator)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1, 2}
    assert (y > 0).sum() < (labels > 0).sum()  # zoomed out: the ball shrinks
    agreement = (x[:, 0].round().long() == y).float().mean()
    assert agreement > 0.97  # bilinear image and nearest label differ only at edges


def test_intensity_is_drawn_per_channel_and_leaves_labels_alone():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 1, 6, 6, 6).repeat(1, 3, 1, 1, 1)
    labels = torch.randint(0, 3, (2, 6, 6, 6), generator=generator)
    settings = SegmentationAugmentSettings(flip_axes=(), affine_probability=0, noise_std=0)
    x, y = augment_segmentation_batch(images, labels, settings, generator)
    assert torch.equal(y, labels)
    assert not torch.allclose(x[:, 0], x[:, 1]) and not torch.allclose(x[:, 1], x[:, 2])
    off = SegmentationAugmentSettings(enabled=False)
    assert augment_segmentation_batch(images, labels, off, generator)[0] is images
