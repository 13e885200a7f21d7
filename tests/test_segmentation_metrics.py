"""radflow.tasks.segmentation.metrics: hand-computed cases, MONAI and SimpleITK, conventions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from scipy import ndimage

from radflow.tasks.segmentation import metrics as SM

ANISOTROPIC = (1.0, 1.0, 3.0)


def _cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def _ball(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    grid = np.indices(shape, dtype=float) * np.reshape(spacing, (-1, 1, 1, 1))
    return np.sum((grid - np.reshape(centre_mm, (-1, 1, 1, 1))) ** 2, axis=0) <= radius_mm**2


def _blob(shape, seed: int, fraction: float = 0.25, sigma: float = 2.0) -> np.ndarray:
    """Smooth random mask (several irregular components) covering ``fraction`` of the grid."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


# ---------------------------------------------------------------- hand-computed answers
def test_dice_of_half_overlapping_cubes():
    a = _cube((30, 30, 30), (5, 5, 5), 10)
    b = _cube((30, 30, 30), (10, 5, 5), 10)  # shares 5 x 10 x 10 = 500 of 1000 voxels
    assert SM.dice(a, b) == pytest.approx(2 * 500 / 2000)
    assert SM.dice(a, a) == 1.0
    assert SM.dice(a, ~a) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hausdorff_of_shifted_cubes_scales_with_the_spacing_along_the_shift(axis):
    # A 10-voxel cube and the same cube 4 voxels further along `axis`: the face that
    # leads is 4 voxels from the other cube's face, every other boundary voxel closer.
    start = [5, 5, 5]
    moved = list(start)
    moved[axis] += 4
    a, b = _cube((25, 25, 25), start, 10), _cube((25, 25, 25), moved, 10)
    hd = SM.hausdorff_distance_mm(a, b, ANISOTROPIC, percentile=100)
    assert hd == pytest.approx(4 * ANISOTROPIC[axis])
    assert SM.hausdorff_distance_mm(a, b, (1, 1, 1), percentile=100) == pytest.approx(4)


def test_parallel_planes_are_their_separation_apart_at_every_percentile():
    # Every voxel of a one-voxel-thick plane is a boundary voxel, and each one is exactly
    # the separation (2 slices of 3 mm) from the other plane.
    a = np.zeros((12, 12, 8), dtype=bool)
    b = a.copy()
    a[:, :, 2] = True
    b[:, :, 4] = True
    assert SM.hausdorff_distance_mm(a, b, ANISOTROPIC) == pytest.approx(6.0)
    assert SM.hausdorff_distance_mm(a, b, ANISOTROPIC, percentile=50) == pytest.approx(6.0)
    assert SM.normalised_surface_dice(a, b, ANISOTROPIC, 5.99) == 0.0
    assert SM.normalised_surface_dice(a, b, ANISOTROPIC, 6.0) == 1.0  # the tolerance is inclusive


def test_hd95_interpolates_between_the_directed_distances():
    # Reference: a line of 19 voxels. Prediction: the same line and one voxel 10 slices
    # (30 mm) above its middle. pred -> ref: 19 zeros and 30 mm, whose 95th percentile
    # (linear, position 0.95 * 19 = 18.05) is 0.05 * 30 = 1.5 mm; ref -> pred: all 0.
    ref = np.zeros((20, 10, 12), dtype=bool)
    ref[:19, 5, 0] = True
    pred = ref.copy()
    pred[9, 5, 10] = True
    assert SM.hausdorff_distance_mm(pred, ref, ANISOTROPIC) == pytest.approx(1.5)
    assert SM.hausdorff_distance_mm(pred, ref, ANISOTROPIC, percentile=100) == pytest.approx(30)
    pred_to_ref, ref_to_pred = SM.surface_distances_mm(pred, ref, ANISOTROPIC)
    assert sorted(pred_to_ref) == [0.0] * 19 + [30.0]
    assert not ref_to_pred.any()


def test_nsd_counts_the_boundary_voxels_within_tolerance():
    # Reference: a line of 10 voxels; prediction: a line over its first half, 2 slices
    # (6 mm) away. Within 6 mm: all 5 prediction voxels and the 5 reference voxels under
    # them; the other reference voxels are sqrt(k^2 + 36) > 6 mm away. NSD = 10 / 15.
    ref = np.zeros((12, 5, 6), dtype=bool)
    pred = ref.copy()
    ref[:10, 2, 1] = True
    pred[:5, 2, 3] = True
    assert SM.normalised_surface_dice(pred, ref, ANISOTROPIC, 6.0) == pytest.approx(10 / 15)
    assert SM.normalised_surface_dice(pred, ref, ANISOTROPIC, 100.0) == 1.0


def test_volume_in_millilitres_uses_the_voxel_volume():
    cube = _cube((20, 20, 20), (0, 0, 0), 10)  # 1000 voxels of 0.5 x 1 x 3 mm = 1.5 mL
    assert SM.volume_ml(cube, (0.5, 1.0, 3.0)) == pytest.approx(1.5)
    assert SM.volume_ml(np.where(cube, 4, 0), (1, 1, 1)) == pytest.approx(1.0)


def test_image_diagonal_is_the_brats_worst_distance():
    assert SM.image_diagonal_mm((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.005)
    assert SM.image_diagonal_mm((4, 3), (1.0, 4 / 3)) == pytest.approx(math.hypot(4, 4))


# ---------------------------------------------------------------- independent implementations
def _tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask[None, None].astype(np.float32))


def _sitk_image(mask: np.ndarray, spacing) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK is (x, y, z)
    return image


def _sitk_hausdorff(a: np.ndarray, b: np.ndarray, spacing) -> float:
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(_sitk_image(a, spacing), _sitk_image(b, spacing))
    return hausdorff.GetHausdorffDistance()


CASES = [
    (seed, spacing)
    for seed in range(4)
    for spacing in [(1.0, 1.0, 1.0), ANISOTROPIC, (0.7, 1.3, 2.5)]
]


@pytest.fixture(params=CASES, ids=lambda c: f"seed{c[0]}-{'x'.join(map(str, c[1]))}")
def random_pair(request):
    seed, spacing = request.param
    shape = (36, 32, 18)
    return _blob(shape, seed), _blob(shape, seed + 100, fraction=0.2), spacing


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own use of a deprecated option
def test_agrees_with_monai_on_random_masks(random_pair):
    pred, ref, spacing = random_pair
    dice = DiceMetric(include_background=True)(_tensor(pred), _tensor(ref)).item()
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)(
        _tensor(pred), _tensor(ref), spacing=spacing
    ).item()
    nsd = SurfaceDiceMetric(class_thresholds=[2.0], include_background=True)(
        _tensor(pred), _tensor(ref), spacing=spacing
    ).item()
    # MONAI returns float32 (eps 1.2e-7; its quantile adds a few ulps): agreement to that.
    assert SM.dice(pred, ref) == pytest.approx(dice, abs=1e-6)
    assert SM.hausdorff_distance_mm(pred, ref, spacing) == pytest.approx(hd95, rel=2e-6)
    assert SM.normalised_surface_dice(pred, ref, spacing, 2.0) == pytest.approx(nsd, abs=1e-6)


def test_agrees_with_simpleitk_on_random_masks(random_pair):
    pred, ref, spacing = random_pair
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(_sitk_image(pred, spacing), _sitk_image(ref, spacing))
    assert SM.dice(pred, ref) == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-12)

    # ITK's label contour with face connectivity is this module's boundary (on a padded
    # grid, so that the array edge is outside for both); the Hausdorff distance of the
    # two contours is then the 100th-percentile distance here, through ITK's own
    # distance maps in physical space.
    def contour(mask):
        padded = _sitk_image(np.pad(mask, 1), spacing)
        return sitk.GetArrayFromImage(sitk.LabelContour(padded, fullyConnected=False)) > 0

    edge_pred, edge_ref = contour(pred), contour(ref)
    assert np.array_equal(edge_pred[1:-1, 1:-1, 1:-1], SM._boundary(pred))
    expected = _sitk_hausdorff(edge_pred, edge_ref, spacing)
    hd = SM.hausdorff_distance_mm(pred, ref, spacing, percentile=100)
    assert hd == pytest.approx(expected, rel=1e-9)


def test_surface_distances_equal_the_distance_transform_with_sampling(random_pair):
    pred, ref, spacing = random_pair
    edge_pred, edge_ref = SM._boundary(pred), SM._boundary(ref)
    pred_to_ref, ref_to_pred = SM.surface_distances_mm(pred, ref, spacing)
    edt = ndimage.distance_transform_edt
    np.testing.assert_allclose(pred_to_ref, edt(~edge_ref, sampling=spacing)[edge_pred], atol=1e-9)
    np.testing.assert_allclose(ref_to_pred, edt(~edge_pred, sampling=spacing)[edge_ref], atol=1e-9)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISOTROPIC])
def test_mask_hausdorff_of_offset_balls_matches_simpleitk(spacing):
    # For two overlapping balls the farthest boundary voxel lies outside the other ball,
    # so the boundary-based Hausdorff distance equals ITK's mask-based one.
    shape = (40, 40, 30)
    a = _ball(shape, (18, 20, 14), 10, spacing)
    b = _ball(shape, (22, 21, 12), 9, spacing)
    expected = _sitk_hausdorff(a, b, spacing)
    assert SM.hausdorff_distance_mm(a, b, spacing, percentile=100) == pytest.approx(expected)


# ---------------------------------------------------------------- empty masks
def test_both_empty_is_a_perfect_score():
    empty = np.zeros((10, 10, 5), dtype=np.uint8)
    assert SM.dice(empty, empty) == 1.0
    assert SM.normalised_surface_dice(empty, empty, ANISOTROPIC, 1.0) == 1.0
    assert SM.hausdorff_distance_mm(empty, empty, ANISOTROPIC) == 0.0
    lesions = SM.lesion_detection(empty, empty, ANISOTROPIC)
    assert (lesions.tp, lesions.fp, lesions.fn, lesions.f1) == (0, 0, 0, 1.0)
    assert math.isnan(lesions.precision) and math.isnan(lesions.recall)


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_scores_zero_and_the_worst_distance(empty_side):
    shape = (20, 20, 10)
    mask = _cube(shape, (2, 2, 2), 4)
    empty = np.zeros(shape, dtype=bool)
    pred, ref = (empty, mask) if empty_side == "pred" else (mask, empty)
    diagonal = math.sqrt(20**2 + 20**2 + 30**2)
    assert SM.dice(pred, ref) == 0.0
    assert SM.normalised_surface_dice(pred, ref, ANISOTROPIC, 1.0) == 0.0
    assert SM.hausdorff_distance_mm(pred, ref, ANISOTROPIC) == pytest.approx(diagonal)
    assert math.isnan(SM.hausdorff_distance_mm(pred, ref, ANISOTROPIC, one_empty_mm=math.nan))
    assert SM.hausdorff_distance_mm(pred, ref, ANISOTROPIC, one_empty_mm=373.13) == 373.13
    assert SM.lesion_detection(pred, ref, ANISOTROPIC).f1 == 0.0


# ---------------------------------------------------------------- lesions
def test_lesion_f1_with_one_of_two_lesions_found():
    shape = (30, 30, 10)
    ref = _cube(shape, (2, 2, 2), 4) | _cube(shape, (20, 20, 2), 4)
    pred = _cube(shape, (3, 3, 3), 2)  # inside the first lesion only
    lesions = SM.lesion_detection(pred, ref, ANISOTROPIC)
    assert (lesions.n_ref, lesions.n_pred, lesions.tp, lesions.fp, lesions.fn) == (2, 1, 1, 0, 1)
    assert (lesions.precision, lesions.recall) == (1.0, 0.5)
    assert lesions.f1 == pytest.approx(2 / 3)
    far = pred | _cube(shape, (12, 25, 5), 2)  # plus a lesion where there is none
    assert dataclasses.astuple(SM.lesion_detection(far, ref, ANISOTROPIC)) == (2, 2, 1, 1, 1)


def test_split_prediction_is_one_hit_and_no_false_positive():
    shape = (30, 30, 10)
    ref = _cube(shape, (5, 5, 2), 8)
    pred = _cube(shape, (5, 5, 2), 3) | _cube(shape, (10, 10, 2), 3)  # two pieces of it
    lesions = SM.lesion_detection(pred, ref, ANISOTROPIC)
    assert dataclasses.astuple(lesions) == (1, 2, 1, 0, 0)
    assert lesions.f1 == 1.0


def test_merged_prediction_hits_both_lesions():
    shape = (30, 30, 10)
    ref = _cube(shape, (2, 2, 2), 4) | _cube(shape, (12, 2, 2), 4)
    pred = np.zeros(shape, dtype=bool)
    pred[2:16, 2:6, 2:6] = True  # one blob over both and the gap between them
    lesions = SM.lesion_detection(pred, ref, ANISOTROPIC)
    assert dataclasses.astuple(lesions) == (2, 1, 2, 0, 0)
    assert lesions.f1 == 1.0


def test_lesion_connectivity_joins_corner_neighbours_only_at_26():
    ref = np.zeros((6, 6, 6), dtype=bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # share a corner
    assert SM.lesion_detection(ref, ref, ANISOTROPIC, connectivity=26).n_ref == 1
    assert SM.lesion_detection(ref, ref, ANISOTROPIC, connectivity=18).n_ref == 2
    assert SM.lesion_detection(ref, ref, ANISOTROPIC, connectivity=6).n_ref == 2
    with pytest.raises(ValueError, match="connectivity"):
        SM.lesion_detection(ref, ref, ANISOTROPIC, connectivity=8)


def test_lesions_below_the_minimum_volume_are_ignored():
    shape = (20, 20, 10)
    ref = _cube(shape, (2, 2, 2), 4)
    pred = ref.copy()
    pred[12:14, 12:14, 2] = True  # a stray 2 x 2 x 1 voxels of 3 mm^3: 12 mm^3
    assert SM.lesion_detection(pred, ref, ANISOTROPIC, min_lesion_mm3=12).fp == 1
    assert SM.lesion_detection(pred, ref, ANISOTROPIC, min_lesion_mm3=12.5).fp == 0


# ---------------------------------------------------------------- regions
def _brats_case(shape=(40, 40, 20)):
    ref = np.zeros(shape, dtype=np.uint8)
    ref[5:25, 5:25, 2:14] = 2  # oedema
    ref[8:20, 8:20, 4:12] = 4  # enhancing rim
    ref[11:17, 11:17, 6:10] = 1  # necrosis
    return ref


def test_region_rows_for_brats_regions():
    ref = _brats_case()
    pred = np.where(ref == 4, 1, ref)  # enhancing called necrosis: core right, ET missed
    settings = SM.SegmentationMetricSettings(nsd_tolerance_mm=1.0)
    rows = SM.region_metrics(pred, ref, ANISOTROPIC, SM.BRATS_2015_REGIONS, settings)
    by_region = {row.region: row for row in rows}
    assert list(by_region) == ["whole_tumour", "tumour_core", "enhancing_tumour"]
    for region in ("whole_tumour", "tumour_core"):
        row = by_region[region]
        assert (row.dice, row.hd95_mm, row.nsd, row.lesion_f1) == (1.0, 0.0, 1.0, 1.0)
        assert row.volume_error_ml == 0.0 and row.volume_relative_error == 0.0
    et = by_region["enhancing_tumour"]
    assert (et.dice, et.nsd, et.pred_volume_ml) == (0.0, 0.0, 0.0)
    assert et.ref_volume_ml == pytest.approx((12 * 12 * 8 - 6 * 6 * 4) * 3 / 1000)
    assert et.volume_relative_error == -1.0
    assert et.hd95_mm == pytest.approx(SM.image_diagonal_mm(ref.shape, ANISOTROPIC))
    assert (et.lesion_tp, et.lesion_fn, et.lesion_recall, et.lesion_f1) == (0, 1, 0.0, 0.0)
    undefined = dataclasses.replace(settings, hd95_one_empty_mm=math.nan)
    rows = SM.region_metrics(pred, ref, ANISOTROPIC, SM.BRATS_2015_REGIONS, undefined)
    assert math.isnan(rows[2].hd95_mm)


def test_region_rows_equal_the_single_metrics_on_full_masks():
    # region_metrics crops once to all foreground; the functions below see whole arrays.
    shape = (36, 32, 18)
    rng = np.random.default_rng(7)
    ref = np.where(_blob(shape, 1), rng.integers(1, 5, shape), 0)
    pred = np.where(_blob(shape, 2), rng.integers(1, 5, shape), 0)
    settings = SM.SegmentationMetricSettings(nsd_tolerance_mm=2.0, min_lesion_mm3=9.0)
    for row in SM.region_metrics(pred, ref, ANISOTROPIC, SM.BRATS_2015_REGIONS, settings):
        labels = SM.BRATS_2015_REGIONS[row.region]
        p, r = np.isin(pred, labels), np.isin(ref, labels)
        lesions = SM.lesion_detection(p, r, ANISOTROPIC, min_lesion_mm3=9.0)
        assert row.dice == SM.dice(p, r)
        assert row.hd95_mm == SM.hausdorff_distance_mm(p, r, ANISOTROPIC)
        assert row.nsd == SM.normalised_surface_dice(p, r, ANISOTROPIC, 2.0)
        assert row.ref_volume_ml == pytest.approx(SM.volume_ml(r, ANISOTROPIC))
        assert row.pred_volume_ml == pytest.approx(SM.volume_ml(p, ANISOTROPIC))
        assert (row.lesion_tp, row.lesion_fp, row.lesion_fn) == (lesions.tp, lesions.fp, lesions.fn)
        assert row.ref_lesions > 1 and row.lesion_f1 == lesions.f1


def test_input_checks():
    a = np.zeros((4, 4, 4), dtype=bool)
    settings = SM.SegmentationMetricSettings(nsd_tolerance_mm=1.0)
    with pytest.raises(ValueError, match="shape"):
        SM.dice(a, a[:3])
    with pytest.raises(ValueError, match="spacing_mm"):
        SM.hausdorff_distance_mm(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        SM.volume_ml(a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="background"):
        SM.region_metrics(a, a, (1, 1, 1), {"all": [0, 1]}, settings)


def test_a_brats_sized_case_with_scattered_false_positives():
    # 240 x 240 x 155 at 1 mm, a ~100 mL tumour and false positives scattered over the
    # whole image, which stretch the crop to the full grid for the whole-tumour region
    # (its cost: benchmarks/segmentation.py, not a test).
    shape = (240, 240, 155)
    ref = np.zeros(shape, dtype=np.uint8)
    ball = _ball((60, 60, 60), (30, 30, 30), 29, (1, 1, 1))
    ref[90:150, 80:140, 50:110][ball] = 2
    ref[90:150, 80:140, 50:110][_ball((60, 60, 60), (30, 30, 30), 20, (1, 1, 1))] = 4
    pred = np.roll(ref, 3, axis=0)
    pred[np.random.default_rng(0).random(shape) < 1e-4] = 2
    settings = SM.SegmentationMetricSettings(nsd_tolerance_mm=1.0)
    rows = SM.region_metrics(pred, ref, (1, 1, 1), SM.BRATS_2015_REGIONS, settings)
    # the core is only shifted by 3 mm: every boundary voxel has its image 3 mm away
    assert rows[0].lesion_fp > 500 and 0 < rows[1].hd95_mm <= 3.0


# ---------------------------------------------------------------- bootstrap over cases
def test_bootstrap_mean_ci_contains_the_mean_and_repeats_with_its_seed():
    dice_per_case = np.random.default_rng(0).beta(8, 2, size=60)
    a = SM.bootstrap_mean_ci(dice_per_case, n_boot=500, seed=4)
    assert a.mean == pytest.approx(dice_per_case.mean())
    assert a.low < a.mean < a.high
    assert (a.n_cases, a.n_undefined) == (60, 0)
    assert a == SM.bootstrap_mean_ci(dice_per_case, n_boot=500, seed=4)
    assert a != SM.bootstrap_mean_ci(dice_per_case, n_boot=500, seed=5)
    # the standard error of a mean of 60: the 95% interval is about +-1.96 sd / sqrt(60)
    half_width = 1.96 * dice_per_case.std() / math.sqrt(60)
    assert (a.high - a.low) / 2 == pytest.approx(half_width, rel=0.2)


def test_bootstrap_mean_ci_leaves_out_and_counts_undefined_cases():
    hd95 = np.array([2.0, 4.0, np.nan, 6.0, np.nan, 8.0])
    r = SM.bootstrap_mean_ci(hd95, n_boot=300, seed=1)
    assert r.mean == pytest.approx(5.0)
    assert (r.n_cases, r.n_undefined) == (6, 2)
    assert 2.0 <= r.low < 5.0 < r.high <= 8.0
    with pytest.raises(ValueError, match="inf"):
        SM.bootstrap_mean_ci([1.0, np.inf])


def test_bootstrap_mean_ci_resamples_patients_as_a_whole():
    # Two patients of three cases each with identical values: resampling patients gives
    # only the means 1, 2 and 1.5, the last when both are drawn.
    values = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    r = SM.bootstrap_mean_ci(values, groups=[0, 0, 0, 1, 1, 1], n_boot=400, seed=0)
    assert (r.low, r.high) == (1.0, 2.0)
    assert r.mean == 1.5
