import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from radflow.models.unet import ResidualUNet
from radflow.tasks.segmentation.inference import gaussian_weights, mirror_flips, predict_volume

pytest.importorskip("monai.inferers")


def _volume(shape, channels=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)


def _conv(kernel: int, seed: int, symmetric: bool = False) -> nn.Module:
    """A fixed convolution 2 -> 3 channels (logits); `symmetric`: its kernel is the same
    flipped along any axis, so the model commutes with flips."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(2, 3, kernel, padding=kernel // 2)
    if symmetric:
        with torch.no_grad():
            weight = conv.weight
            for axes in ([2], [3], [4]):
                weight = (weight + torch.flip(weight, axes)) / 2
            conv.weight.copy_(weight)
    return conv.eval()


def _whole(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(image)[None]).softmax(1)[0]


@pytest.mark.parametrize("shape", [(37, 41, 29), (16, 16, 16), (33, 16, 17)])
def test_pointwise_model_stitches_to_the_whole_volume_output_at_any_size(shape):
    image = _volume(shape)
    model = _conv(1, seed=0)
    out = predict_volume(model, image, (16, 16, 16), overlap=0.5, sw_batch_size=3)
    assert out.shape == (3, *shape) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, _whole(model, image), rtol=1e-5, atol=1e-6)


def test_convolution_stitches_to_the_whole_volume_output_but_for_window_edges():
    # a 3^3 convolution sees zeros past a window's inner edge where the whole volume has
    # voxels; such a voxel weighs e^-7 there (7.5 voxels from the centre at sigma 2)
    # against e^-2 or more in the neighbour window that holds it within 4 voxels of
    # its centre: under 1% of the difference
    image = _volume((40, 24, 24))
    model = _conv(3, seed=1)
    out = predict_volume(model, image, (16, 16, 16))
    whole = _whole(model, image)
    assert (out - whole).abs().max() < 5e-3
    assert (out - whole).abs().mean() < 1e-4
    # and exactly where only one window holds a voxel (windows start every 8 voxels)
    torch.testing.assert_close(out[:, :8, :8, :8], whole[:, :8, :8, :8])
    torch.testing.assert_close(out[:, -8:, -8:, -8:], whole[:, -8:, -8:, -8:])


def test_gaussian_weights_are_nnunets_without_monais_floor():
    weights = gaussian_weights((16, 12, 9))
    assert weights.shape == (16, 12, 9) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.flip(weights, (0, 1, 2)))  # symmetric
    assert weights[7, 5, 4] == weights.max() and weights[8, 6, 4] == weights[7, 5, 4]
    # sigma = 0.125 x 16 = 2 voxels along axis 0; index 7 is 0.5 from the centre, 9 is 1.5
    assert (weights[9, 5, 4] / weights[7, 5, 4]).item() == pytest.approx(
        np.exp(-(1.5**2 - 0.5**2) / (2 * 2**2)), rel=1e-5
    )
    corner = np.exp(-(7.5**2) / 8 - 5.5**2 / (2 * 1.5**2) - 4**2 / (2 * 1.125**2))
    assert weights[0, 0, 0].item() == pytest.approx(corner, rel=1e-4)
    assert weights[0, 0, 0] < 1e-6  # MONAI's map would hold 1e-3 here


class _WindowCoordinate(nn.Module):
    """Logit = the position inside the window along the last axis, whatever the input:
    what each window contributes shows where the windows lie and how they weigh."""

    def forward(self, x):
        width = x.shape[-1]
        ramp = torch.arange(width, dtype=x.dtype) * 0.2 - 1.5
        return ramp.expand(x.shape[0], 1, *x.shape[2:]).clone()


def test_gaussian_weights_blend_overlapping_windows_as_nnunet():
    image = np.zeros((1, 16, 24), np.float32)  # 2D: one window in rows, two in columns
    out = predict_volume(_WindowCoordinate(), image, (16, 16), activation="sigmoid")
    sigma = 0.125 * 16
    centre = np.arange(16) - 7.5
    gauss = np.exp(-(centre**2) / (2 * sigma**2))
    weight = np.outer(gauss, gauss)
    value = 1 / (1 + np.exp(-(np.arange(16) * 0.2 - 1.5)))
    total, norm = np.zeros((16, 24)), np.zeros((16, 24))
    for origin in (0, 8):  # windows of 16 at stride 8 (overlap 0.5), the last flush
        total[:, origin : origin + 16] += weight * value
        norm[:, origin : origin + 16] += weight
    np.testing.assert_allclose(out[0].numpy(), total / norm, rtol=1e-5)


def test_weights_are_normalised_a_constant_model_gives_its_constant():
    class Constant(nn.Module):
        def forward(self, x):
            logits = torch.tensor([0.0, np.log(3.0), 1.0]).view(1, 3, 1, 1, 1)
            return logits.expand(x.shape[0], 3, *x.shape[2:])

    out = predict_volume(Constant(), _volume((30, 21, 19)), (16, 8, 16), overlap=0.6)
    expected = torch.tensor([1.0, 3.0, np.e]) / (4 + np.e)
    torch.testing.assert_close(out, expected.view(3, 1, 1, 1).expand_as(out), rtol=1e-5, atol=0)


def test_mirroring_leaves_a_flip_equivariant_model_unchanged():
    image = _volume((20, 18, 24))
    model = _conv(3, seed=2, symmetric=True)
    plain = predict_volume(model, image, (16, 16, 16))
    mirrored = predict_volume(model, image, (16, 16, 16), mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-6)


def test_mirroring_averages_the_flipped_predictions_flipped_back():
    image = _volume((16, 16, 16))  # one window: the stitching is the identity
    model = _conv(3, seed=3)
    out = predict_volume(model, image, (16, 16, 16), mirror_axes=(0, 2))
    x = torch.from_numpy(image)[None]
    expected = []
    with torch.no_grad():
        for axes in ((), (2,), (4,), (2, 4)):
            flipped = torch.flip(x, axes) if axes else x
            probabilities = model(flipped).softmax(1)
            expected.append(torch.flip(probabilities, axes) if axes else probabilities)
    torch.testing.assert_close(out, torch.stack(expected).mean(0)[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, _whole(model, image), atol=1e-3)  # it did flip
    assert mirror_flips((2, 0)) == [(), (0,), (2,), (0, 2)]


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    image = _volume((10, 13, 7)).astype(np.float16)
    model = _conv(1, seed=4)
    out = predict_volume(model, image, (16, 16, 16))
    assert out.shape == (3, 10, 13, 7)
    torch.testing.assert_close(out, _whole(model, image.astype(np.float32)), rtol=1e-5, atol=1e-6)
    unet = ResidualUNet((1, 1, 1), in_channels=2, n_classes=4, base_width=4)
    probabilities = predict_volume(unet, image, (16, 16, 16), mirror_axes=(0,))
    assert probabilities.shape == (4, 10, 13, 7)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(10, 13, 7))


def test_bad_arguments_are_clear_errors():
    image = _volume((8, 8, 8))
    model = _conv(1, seed=5)
    with pytest.raises(ValueError, match="patch size"):
        predict_volume(model, image, (8, 8))
    with pytest.raises(ValueError, match="mirror_axes"):
        predict_volume(model, image, (8, 8, 8), mirror_axes=(3,))
    with pytest.raises(ValueError, match="activation"):
        predict_volume(model, image, (8, 8, 8), activation="relu")


def test_every_subset_of_the_mirror_axes_is_used_once():
    flips = mirror_flips((0, 1, 2))
    assert sorted(flips) == sorted(
        c for k in range(4) for c in itertools.combinations((0, 1, 2), k)
    )


def test_a_read_only_memory_map_is_predicted_without_warnings(tmp_path):
    np.save(tmp_path / "image.npy", _volume((9, 8, 7)))
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    model = _conv(1, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = predict_volume(model, image, (8, 8, 8))
    torch.testing.assert_close(out, _whole(model, np.array(image)), rtol=1e-5, atol=1e-6)
