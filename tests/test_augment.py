import dataclasses

import pytest
import torch

from radflow.augment import AugmentSettings, augment_batch

NEUTRAL = AugmentSettings(
    rotation_deg=0,
    scale=(1, 1),
    translate_fraction=0,
    brightness=0,
    contrast=(1, 1),
    gamma=(1, 1),
    noise_std=0,
)


def _batch():
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:12, 20:24] = 1.0
    return x


def test_disabled_augmentation_is_identity():
    x = _batch()
    out = augment_batch(x, AugmentSettings(enabled=False), torch.Generator().manual_seed(0))
    assert out is x


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_ranges_reproduce_the_input(dims):
    x = _batch() if dims == 2 else _volume_batch()
    out = augment_batch(x, NEUTRAL, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_augmentation_is_seeded_and_varies_per_image():
    settings = AugmentSettings()
    a = augment_batch(_batch(), settings, torch.Generator().manual_seed(1))
    b = augment_batch(_batch(), settings, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])  # independent draws per image


def test_horizontal_flip_moves_the_structure():
    flip = dataclasses.replace(NEUTRAL, hflip_probability=1.0)
    out = augment_batch(_batch(), flip, torch.Generator().manual_seed(0))
    assert out[0, 0, 8:12, 8:12].mean() > 0.9 and out[0, 0, 8:12, 20:24].mean() < 0.1


def test_zscored_images_keep_their_scale_and_background():
    x = torch.full((2, 1, 32, 32), -1.5)  # z-scored MR-like: background well below 0
    x[:, :, 10:20, 10:20] = 2.0
    settings = dataclasses.replace(NEUTRAL, rotation_deg=30, gamma=(0.7, 1.4))
    out = augment_batch(x, settings, torch.Generator().manual_seed(0))
    assert out.min() >= -1.5 - 1e-5 and out.max() <= 2.0 + 1e-5
    assert out[:, :, 0, 0].allclose(torch.tensor(-1.5))  # rotated-in corners are background
    assert (out > 1.9).sum() > 100  # the bright square was not clamped away


def _volume_batch():
    """Two volumes (B, C, D, H, W) with an off-centre block, asymmetric on every axis."""
    x = torch.zeros(2, 1, 16, 20, 24)
    x[:, :, 3:6, 4:8, 15:20] = 1.0
    return x


def test_3d_flip_mirrors_the_left_right_axis_only():
    x = _volume_batch()
    flip = dataclasses.replace(NEUTRAL, hflip_probability=1.0)
    out = augment_batch(x, flip, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.flip(x, dims=[4]), atol=1e-5, rtol=0)


def test_3d_rotation_moves_the_block_off_every_axis_and_keeps_its_mass():
    x = _volume_batch()
    rotate = dataclasses.replace(NEUTRAL, rotation_deg=20)
    out = augment_batch(x, rotate, torch.Generator().manual_seed(4))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], x[0], atol=0.05)  # rotated
    assert not torch.allclose(out[0], out[1], atol=0.05)  # drawn per volume
    # a rotation about the centre of a block well inside the volume keeps its mass (~)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), x.sum(dim=(1, 2, 3, 4)), rtol=0.1,
                               atol=0)  # fmt: skip
    again = augment_batch(x, rotate, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, again)  # seeded


def test_3d_intensity_transforms_per_volume():
    x = _volume_batch() * 3.0 - 1.0  # z-scored-like range [-1, 2]
    intensity = dataclasses.replace(NEUTRAL, contrast=(0.5, 0.5))
    out = augment_batch(x, intensity, torch.Generator().manual_seed(0))
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(out, (x - mean) * 0.5 + mean, atol=1e-5, rtol=0)
