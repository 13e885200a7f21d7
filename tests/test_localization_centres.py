"""Centre-heatmap targets, loss and decoding of the localisation task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radflow.tasks.localization.centres import (
    IGNORE,
    N_OUTPUTS,
    centre_loss,
    extract_candidates,
    merge_candidates,
    nms_mm,
    patch_targets,
    render_nodule_labels,
)
from radflow.tasks.localization.task import patch_cpm


def test_rendered_nodule_targets_recover_centre_and_diameter():
    centres = np.array([[10.3, 12.6, 14.2], [24.0, 8.0, 20.0]])
    labels, counts = render_nodule_labels((32, 32, 32), centres, [8.0, 30.0], (1.0, 1.0, 1.0),
                                          [False, True])  # fmt: skip
    assert set(np.unique(labels)) == {0, 1, IGNORE}
    assert labels[10, 13, 14] == 1 and labels[24, 8, 20] == IGNORE
    targets = patch_targets(torch.as_tensor(labels[None].astype(np.int64)))
    (b, z, y, x) = (int(t[0]) for t in targets["centre"])
    centre = np.array([z, y, x]) + targets["offset"][0].numpy()
    np.testing.assert_allclose(centre, centres[0], atol=0.15)
    assert np.exp(float(targets["size"][0])) == pytest.approx(8.0, rel=0.08)
    assert targets["heatmap"][0, z, y, x] == 1.0
    # the excluded finding is ignored by the loss, the rest weighs 1
    assert targets["weight"][0, 24, 8, 20] == 0 and targets["weight"][0, 0, 0, 0] == 1


def test_nodule_cut_by_the_patch_border_is_ignored_not_mislocated():
    labels, _ = render_nodule_labels((16, 16, 16), np.array([[1.0, 8.0, 8.0]]), [10.0],
                                     (1.0, 1.0, 1.0))  # fmt: skip
    targets = patch_targets(torch.as_tensor(labels[None].astype(np.int64)))
    assert len(targets["size"]) == 0
    assert float(targets["weight"][0][torch.as_tensor(labels) == 1].max()) == 0.0


def test_loss_is_lower_for_the_right_heatmap_and_has_gradients():
    labels, _ = render_nodule_labels((16, 32, 32), np.array([[8.0, 16.0, 16.0]]), [6.0],
                                     (1.0, 1.0, 1.0))  # fmt: skip
    y = torch.as_tensor(labels[None].astype(np.int64))
    targets = patch_targets(y)
    good = torch.zeros(1, N_OUTPUTS, 16, 32, 32)
    good[:, 0] = torch.logit(targets["heatmap"].clamp(1e-4, 1 - 1e-4))
    good[:, 4] = targets["size"][0]
    bad = torch.zeros(1, N_OUTPUTS, 16, 32, 32, requires_grad=True)
    assert centre_loss(good, y) < 0.2 * centre_loss(bad, y)
    centre_loss(bad, y).backward()
    assert torch.isfinite(bad.grad).all() and bad.grad.abs().sum() > 0


def test_candidates_are_heatmap_peaks_refined_and_suppressed():
    out = torch.zeros(N_OUTPUTS, 20, 20, 20)
    out[0, 5, 5, 5], out[0, 5, 5, 7], out[0, 15, 15, 15] = 0.9, 0.6, 0.4
    out[1, 5, 5, 5] = 0.25  # z offset
    out[4] = float(np.log(5.0))  # 5 voxels across: 10 mm at 2 mm voxels
    found = extract_candidates(out, (2.0, 2.0, 2.0), threshold=0.1, max_candidates=10,
                               min_distance_mm=3.0)  # fmt: skip
    # the 0.6 peak 4 mm from the 0.9 one lies within its 5 mm radius: suppressed
    np.testing.assert_allclose(found["scores"], [0.9, 0.4], rtol=1e-6)
    np.testing.assert_allclose(found["centres"][0], [5.25, 5, 5], atol=1e-6)
    np.testing.assert_allclose(found["diameters_mm"], [10.0, 10.0], rtol=1e-5)


def test_nms_keeps_distant_points_and_merge_averages_models():
    points = np.array([[0.0, 0, 0], [2.0, 0, 0], [20.0, 0, 0]])
    assert list(nms_mm(points, np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.9, 0.1]), 3.0)) == [1, 2]
    a = {
        "points_mm": np.array([[0.0, 0, 0]]),
        "diameters_mm": np.array([6.0]),
        "scores": np.array([0.8]),
    }
    b = {"points_mm": np.array([[1.0, 0, 0], [50.0, 0, 0]]), "diameters_mm": np.array([6.0, 6.0]),
         "scores": np.array([0.4, 0.6])}  # fmt: skip
    merged = merge_candidates([a, b], 5.0)
    np.testing.assert_allclose(merged["scores"], [0.6, 0.3])  # (0.8 + 0.4) / 2, 0.6 / 2
    np.testing.assert_allclose(merged["points_mm"][0], [1 / 3, 0, 0], atol=1e-9)


def test_patch_cpm_perfect_heatmap_scores_one_and_confident_false_peaks_cost():
    labels = np.zeros((2, 16, 16, 16), dtype=np.int64)
    for b, c in enumerate(([8, 8, 8], [6, 9, 7])):
        one, _ = render_nodule_labels((16, 16, 16), np.array([c], float), [5.0], (1.0, 1.0, 1.0))
        labels[b] = one
    heat = patch_targets(torch.as_tensor(labels))["heatmap"].numpy()
    assert patch_cpm(labels, heat) == 1.0
    # three false peaks per patch above the nodules: 6 FPs in 2 patches. Allowed FPs at
    # 1/8..8 per patch: 0, 0, 1, 2, 4, 8, 16 -> the hits count at the last two rates only
    worse = heat * 0.5
    worse[:, 1, 1, [1, 7, 14]] = 1.0
    assert patch_cpm(labels, worse) == pytest.approx(2 / 7)
