"""The volumes layout (radflow.volumes, radflow.geometry): nnU-Net-style preprocessing of
one case and its exact inverse, on small volumes built here with known geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.config import PREPROCESS_KEYS, schema_defaults
from radflow.data import VolumeStore
from radflow.dicom.nifti import write_nifti
from radflow.geometry import (
    CaseGeometry,
    canonical_spacing_mm,
    preprocessed_to_world,
    resample_labels,
    restore_native,
    world_to_preprocessed,
    write_label_nifti,
)
from radflow.tables import read_tsv
from radflow.volumes import (
    VolumeSettings,
    foreground_mask,
    parse_label_voxels,
    preprocess_volume,
    preprocess_volumes_shard,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015"
EXACT = VolumeSettings(dtype="float32")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    rotation = np.eye(3)
    rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
    return rotation


def _affine(columns: np.ndarray, spacing, origin=(12.5, -30.0, 41.0)) -> np.ndarray:
    """RAS affine whose voxel axes point along `columns` (unit vectors) at `spacing`."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, float) * np.asarray(spacing, float)[None, :]
    affine[:3, 3] = origin
    return affine


#: Voxel axes of acquisitions as converters store them (columns: world direction of i, j, k).
ORIENTATIONS = {
    "axial LPS": np.diag([-1.0, -1.0, 1.0]),  # DICOM's order, as dcm2niix keeps it
    "axial RAS": np.eye(3),
    "axial LAI": np.diag([-1.0, 1.0, -1.0]),  # feet-first, rows flipped
    "sagittal": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),  # i: A, j: I, k: L
    "coronal": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float),  # i: R, j: S, k: P
    "oblique": _rotation(0, 25) @ _rotation(2, -17) @ np.diag([-1.0, -1.0, 1.0]),
}


def _world(shape, affine) -> np.ndarray:
    """World coordinates (RAS mm) of every voxel centre, (*shape, 3)."""
    ijk = np.stack(np.indices(shape), -1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _head(shape, affine, *, rng=None, channels=1):
    """A case: an ellipsoid 'head' of tissue on a zero background and, inside it, a
    sphere of label 1 and a smaller one of label 2; image (i, j, k[, C]), mask (i, j, k)."""
    world = _world(shape, affine)
    centre = world.reshape(-1, 3).mean(0)
    extent = np.ptp(world.reshape(-1, 3), axis=0)
    head = (((world - centre) / (0.38 * extent)) ** 2).sum(-1) < 1
    offset = np.array([0.1, -0.05, 0.05]) * extent
    radius = 0.18 * extent.min()
    mask = np.zeros(shape, np.uint8)
    mask[np.linalg.norm(world - centre - offset, axis=-1) < radius] = 1
    mask[np.linalg.norm(world - centre + offset, axis=-1) < radius / 2] = 2
    rng = rng or np.random.default_rng(0)
    image = []
    for c in range(channels):
        tissue = rng.normal(300 * (c + 1), 40 * (c + 1), shape) + 150 * mask
        image.append(np.where(head, tissue, 0.0).astype(np.float32))
    image = np.stack(image, -1)
    return (image[..., 0] if channels == 1 else image), mask


def _dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------ the inverse
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_labels_round_trip_exactly_at_native_spacing(orientation):
    """Reorient, crop, 'resample' at the native spacing and restore: the very mask, in
    the converted image's voxel order, for every acquisition orientation."""
    affine = _affine(ORIENTATIONS[orientation], (0.9, 1.1, 2.0))
    image, mask = _head((30, 26, 14), affine)
    case = preprocess_volume(image, affine, "MR", canonical_spacing_mm(affine), EXACT, mask)
    assert case.geometry.crop_shape == case.image.shape[1:] == case.mask.shape
    assert np.prod(case.geometry.crop_shape) < image.size  # the background was cropped
    np.testing.assert_array_equal(restore_native(case.mask, case.geometry), mask)
    # per-class probabilities restore to the same labels
    probabilities = np.stack([(case.mask == k).astype(np.float32) for k in range(3)])
    np.testing.assert_array_equal(restore_native(probabilities, case.geometry), mask)


def test_canonical_axes_mean_the_same_anatomy_whatever_the_storage_order():
    """The same head stored axially (LPS) and sagittally gives one preprocessed array."""
    axial = _affine(ORIENTATIONS["axial LPS"], (1.0, 1.0, 1.0))
    image, mask = _head((20, 24, 18), axial)
    # the same voxels stored sagittally: i = A (was -j), j = I (was -k), k = R (was -i)
    sagittal_image = image[::-1, ::-1, ::-1].transpose(1, 2, 0)
    sagittal_affine = axial.copy()
    sagittal_affine[:3, :3] = axial[:3, :3][:, [1, 2, 0]] * -1
    sagittal_affine[:3, 3] = axial[:3, :3] @ [19, 23, 17] + axial[:3, 3]
    first = preprocess_volume(image, axial, "MR", (1, 1, 1), EXACT, mask)
    second = preprocess_volume(sagittal_image, sagittal_affine, "MR", (1, 1, 1), EXACT,
                               mask[::-1, ::-1, ::-1].transpose(1, 2, 0))  # fmt: skip
    assert second.geometry.axcodes == "AIR" and first.geometry.axcodes == "LPS"
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.mask, second.mask)
    np.testing.assert_allclose(first.geometry.preprocessed_affine,
                               second.geometry.preprocessed_affine, atol=1e-9)  # fmt: skip


def test_anisotropic_to_isotropic_and_back_keeps_a_sphere():
    """3 mm slices resampled to 1 mm and restored: Dice > 0.95 with the original sphere,
    its centroid in world mm within half a voxel."""
    affine = _affine(ORIENTATIONS["oblique"], (0.8, 0.8, 3.0))
    shape = (64, 64, 20)
    world = _world(shape, affine)
    centre = _world(shape, affine)[30, 34, 9] + [0.3, -0.4, 1.1]
    sphere = (np.linalg.norm(world - centre, axis=-1) < 15).astype(np.uint8)
    image = np.where(sphere > 0, 500.0, 100.0).astype(np.float32) + 0
    case = preprocess_volume(image, affine, "CT", (1.0, 1.0, 1.0), VolumeSettings(), sphere)
    assert case.image.shape[1] > 2.5 * case.geometry.crop_shape[0]  # z upsampled ~3x
    assert case.image.dtype == np.float16
    # in preprocessed space: the sphere's centroid sits on its world centre
    centroid_pre = np.argwhere(case.mask == 1).mean(0)
    world_of_centroid = preprocessed_to_world(centroid_pre, case.geometry, frame="RAS")[0]
    assert np.linalg.norm(world_of_centroid - centre) < 0.5
    restored = restore_native(case.mask, case.geometry)
    assert restored.shape == shape
    assert _dice(restored == 1, sphere == 1) > 0.95
    centroid = world[restored == 1].mean(0)
    assert np.linalg.norm(centroid - world[sphere == 1].mean(0)) < 0.5 * 0.8
    # nearest is the coarse option: still a sphere, a little less faithful
    nearest = restore_native(case.mask, case.geometry, label_method="nearest")
    assert 0.9 < _dice(nearest == 1, sphere == 1) <= _dice(restored == 1, sphere == 1) + 1e-9


def test_linear_label_resampling_invents_no_label():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:8, 2:8] = 1
    labels[5:8, 2:8, 2:8] = 3  # 1 and 3 touch: linear values of 2 would appear between
    out = resample_labels(labels, (23, 17, 9))
    assert set(np.unique(out)) == {0, 1, 3}


@pytest.mark.parametrize("out_shape", [(31, 17, 20), (40, 44, 18), (9, 8, 5)])
def test_label_resampling_is_the_argmax_of_every_resampled_one_hot_map(out_shape):
    """The fast path (foreground labels in their boxes, background as 1 - their sum) gives
    what resampling every label's one-hot map over the whole volume and taking the
    argmax (ties to the lower label) gives."""
    from scipy import ndimage

    from radflow.geometry import grid_transform

    rng = np.random.default_rng(1)
    labels = np.kron(rng.integers(0, 4, (5, 5, 3)), np.ones((4, 5, 3))).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.05] = 3
    scale, offset = grid_transform(labels.shape, out_shape)
    maps = [ndimage.affine_transform((labels == v).astype(np.float32), scale, offset=offset,
                                     output_shape=out_shape, order=1, mode="nearest")
            for v in range(4)]  # fmt: skip
    np.testing.assert_array_equal(resample_labels(labels, out_shape), np.argmax(maps, axis=0))


# ------------------------------------------------------------- crop and intensity
def test_foreground_crop_keeps_every_mask_voxel():
    affine = _affine(np.eye(3), (1.0, 1.0, 1.0))
    image = np.zeros((40, 40, 30), np.float32)
    image[10:25, 12:30, 5:20] = 200.0
    mask = np.zeros(image.shape, np.uint8)
    mask[12:15, 14:20, 6:9] = 1
    mask[33, 36, 27] = 2  # a labelled voxel outside the image's foreground
    case = preprocess_volume(image, affine, "MR", (1, 1, 1), EXACT, mask)
    assert case.label_voxels() == {1: 3 * 6 * 3, 2: 1}
    # the box is the foreground's and the stray label's, nothing more (z, y, x)
    assert case.geometry.crop_start == (5, 12, 10) and case.geometry.crop_stop == (28, 37, 34)
    margin = preprocess_volume(image, affine, "MR", (1, 1, 1),
                               VolumeSettings(crop_margin_mm=2.5), mask)  # fmt: skip
    assert margin.geometry.crop_start == (2, 9, 7) and margin.geometry.crop_stop == (30, 40, 37)


def test_zscore_per_channel_over_the_foreground():
    affine = _affine(ORIENTATIONS["axial LPS"], (1.0, 1.0, 1.5))
    image, mask = _head((28, 30, 16), affine, channels=2)
    image[..., 1] *= 7.0  # another scale on channel 2
    case = preprocess_volume(image, affine, "MR", canonical_spacing_mm(affine), EXACT, mask)
    head = preprocess_volume((image[..., 0] > 0).astype(np.float32) * 5, affine, "OT",
                             canonical_spacing_mm(affine), VolumeSettings(intensity="none"))  # fmt: skip
    foreground = head.image[0] > 0
    for channel in case.image:
        values = channel[foreground]
        assert values.mean() == pytest.approx(0, abs=1e-5)
        assert values.std() == pytest.approx(1, abs=1e-5)
        assert (channel[~foreground] == 0).all()
    fg = image[..., 0] > 0
    assert case.foreground_mean == pytest.approx([image[..., c][fg].mean() for c in (0, 1)])


def test_constant_background_of_z_scored_data_is_not_foreground():
    """BraTS ships z-scored volumes whose background is one negative constant: the crop
    finds the brain there as nnU-Net's crop to nonzero does with a zero background."""
    image = np.full((30, 30, 30), -3.62, np.float32)
    image[8:20, 5:25, 10:22] = np.random.default_rng(0).normal(0, 1, (12, 20, 12))
    foreground = foreground_mask(image.transpose(2, 1, 0)[None], "mr", EXACT)
    assert foreground.sum() == 12 * 20 * 12


def test_ct_is_windowed_and_cropped_to_the_body():
    affine = _affine(ORIENTATIONS["axial LPS"], (0.7, 0.7, 2.5))
    image = np.full((50, 50, 12), -1000.0, np.float32)  # air
    image[10:40, 15:35, :] = 40.0  # soft tissue
    image[20:25, 20:25, 4:8] = -1000.0  # lung inside the body: kept (holes filled)
    image[:, :, 0] = -2048.0  # padding
    case = preprocess_volume(image, affine, "CT", canonical_spacing_mm(affine), EXACT)
    assert case.scheme == "ct"
    assert case.geometry.crop_start == (1, 15, 10) and case.geometry.crop_stop == (12, 35, 40)
    np.testing.assert_allclose(np.unique(case.image), [0.0, 1040 / 1400], atol=1e-6)


# --------------------------------------------------------------- world coordinates
@pytest.mark.parametrize("orientation", ["axial LPS", "sagittal", "oblique"])
@pytest.mark.parametrize("target", [None, (1.3, 0.6, 0.9)])
def test_world_coordinates_survive_preprocessing(orientation, target):
    """Three channels that hold their own voxels' world x, y, z (mm): after reorienting,
    cropping and resampling (linear interpolation keeps a linear ramp), every interior
    preprocessed voxel holds the world position `preprocessed_to_world` gives it."""
    affine = _affine(ORIENTATIONS[orientation], (0.9, 1.2, 2.0))
    shape = (24, 20, 12)
    world = _world(shape, affine)
    image = (world + 1000.0).astype(np.float32)  # (i, j, k, 3), positive
    mask = np.zeros(shape, np.uint8)
    mask[3:20, 4:17, 2:10] = 1  # the crop follows the mask when the image is all foreground
    spacing = canonical_spacing_mm(affine) if target is None else target
    case = preprocess_volume(image, affine, "OT", spacing, VolumeSettings(intensity="none",
                             dtype="float32", crop_margin_mm=0.0), mask)  # fmt: skip
    grid = np.stack(np.indices(case.image.shape[1:]), -1).reshape(-1, 3)
    expected = preprocessed_to_world(grid, case.geometry, frame="RAS") + 1000.0
    values = case.image.reshape(3, -1).T
    interior = np.all((grid >= 2) & (grid < np.array(case.image.shape[1:]) - 2), axis=1)
    np.testing.assert_allclose(values[interior], expected[interior], atol=2e-3)
    # world -> preprocessed -> world, in both frames, through a manifest row read back
    row = pd.Series(case.geometry.to_row())
    points = world[[0, 5, 23], [0, 7, 19], [0, 3, 11]]
    for frame, sign in (("RAS", 1), ("LPS", np.array([-1, -1, 1]))):
        index = world_to_preprocessed(points * sign, row, frame=frame)
        np.testing.assert_allclose(preprocessed_to_world(index, row, frame=frame),
                                   points * sign, atol=1e-9)  # fmt: skip


def test_a_marked_voxel_lands_where_its_world_position_says():
    affine = _affine(ORIENTATIONS["oblique"], (1.1, 0.9, 2.2))
    image, _ = _head((26, 30, 12), affine)
    voxel = (11, 17, 6)
    image[voxel] = 1e5
    case = preprocess_volume(image, affine, "OT", canonical_spacing_mm(affine),
                             VolumeSettings(intensity="none", dtype="float32"))  # fmt: skip
    found = np.unravel_index(np.argmax(case.image[0]), case.image.shape[1:])
    native_world = affine @ [*voxel, 1]
    np.testing.assert_allclose(
        preprocessed_to_world(found, case.geometry, frame="RAS")[0], native_world[:3], atol=1e-6
    )
    lps = native_world[:3] * [-1, -1, 1]
    np.testing.assert_allclose(world_to_preprocessed(lps, case.geometry, frame="LPS")[0],
                               found, atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------ a shard on disk
def _converted_shard(folder: Path, cases: dict) -> None:
    """A convert-stage shard: NIfTI (channels on the 4th axis), masks, sidecars, manifest."""
    folder.mkdir(parents=True)
    rows = []
    for pid, (image, affine, mask) in cases.items():
        volume = image.T if image.ndim == 3 else np.moveaxis(image, 3, 0).transpose(0, 3, 2, 1)
        write_nifti(folder / f"{pid}{C.NIFTI_SUFFIX}", np.ascontiguousarray(volume), affine)
        if mask is not None:
            write_nifti(folder / f"{pid}{C.MASK_SUFFIX}", mask.T.copy(), affine)
        channels = 1 if image.ndim == 3 else image.shape[3]
        sidecar = {"Modality": "MR", "n_channels": channels, "has_mask": mask is not None}
        (folder / f"{pid}{C.SIDECAR_SUFFIX}").write_text(json.dumps(sidecar))
        rows.append({C.SERIES_PID: pid, C.STATUS: C.STATUS_OK, C.REASON: "", "ndim": 3})
    rows.append({C.SERIES_PID: "ser-flat", C.STATUS: C.STATUS_OK, C.REASON: "", "ndim": 2})
    (folder / "ser-flat.json").write_text("{}")
    pd.DataFrame(rows).to_csv(folder / C.MANIFEST, sep="\t", index=False)


def test_shard_of_multichannel_cases_reads_back_and_restores(tmp_path):
    rng = np.random.default_rng(3)
    cases = {}
    for k, orientation in enumerate(("axial LPS", "oblique", "sagittal")):
        affine = _affine(ORIENTATIONS[orientation], (1.0, 1.0, 2.0))
        image, mask = _head((22, 24, 10), affine, rng=rng, channels=2)
        cases[f"ser-{k}"] = (image, affine, mask if k < 2 else None)
    cases["ser-one-channel"] = (image[..., 0], affine, None)
    _converted_shard(tmp_path / "nifti", cases)
    plan = {"layout": C.LAYOUT_VOLUMES, "target_spacing_mm": [1.5, 1.0, 1.0], "n_channels": 2}
    manifest = preprocess_volumes_shard(tmp_path / "nifti", tmp_path / "pre", plan,
                                        VolumeSettings(), threads=2, progress=False)  # fmt: skip
    assert list(manifest[C.SERIES_PID]) == ["ser-0", "ser-1", "ser-2"]
    skipped = read_tsv(tmp_path / "pre" / C.SKIPPED_TABLE)
    assert dict(zip(skipped[C.SERIES_PID], skipped[C.REASON], strict=True)) == {
        "ser-flat": "2D image: the volumes layout takes 3D images only",
        "ser-one-channel": "1 channels where the plan's cases have 2",
    }
    store = VolumeStore([tmp_path / "pre"])
    assert store.cases == ["ser-0", "ser-1", "ser-2"] and "ser-2" in store
    assert store.mask("ser-2") is None
    for pid in ("ser-0", "ser-1"):
        row = store.row(pid)
        image = store.image(pid)
        assert isinstance(image, np.memmap) and image.dtype == np.float16
        assert image.shape == (2, *CaseGeometry.from_row(row).resampled_shape)
        mask = store.mask(pid)
        counts = np.bincount(np.asarray(mask).ravel())
        assert store.label_voxels(pid) == {1: counts[1], 2: counts[2]}
        assert row["target_spacing_mm"] == "1.5\\1\\1" and row["n_channels"] == 2
        # the inverse: restored onto the converted grid, written, read back, overlaid
        converted = nib.load(tmp_path / "nifti" / f"{pid}{C.MASK_SUFFIX}")
        restored = restore_native(mask, row)
        assert _dice(restored == 1, np.asarray(converted.dataobj) == 1) > 0.9
        written = nib.load(write_label_nifti(tmp_path / f"{pid}_pred.nii.gz", restored, row))
        np.testing.assert_array_equal(np.asarray(written.dataobj), restored)
        np.testing.assert_allclose(written.affine, converted.affine)
    assert parse_label_voxels("") == {}


def test_each_layout_reads_its_own_settings():
    """The volumes settings are exactly their layout's config keys, with the schema's
    defaults; the grid layout's keys are those it always read (its jobs do not rerun)."""
    from dataclasses import fields

    assert {f.name for f in fields(VolumeSettings)} == set(PREPROCESS_KEYS[C.LAYOUT_VOLUMES])
    defaults = schema_defaults("preprocess")
    assert VolumeSettings() == VolumeSettings(
        **{k: defaults[k] for k in PREPROCESS_KEYS[C.LAYOUT_VOLUMES]}
    )
    assert PREPROCESS_KEYS[C.LAYOUT_GRID] == ("target_shape_px", "target_spacing_mm",
                                              "xray_percentiles", "ct_window_hu",
                                              "mr_foreground_fraction", "intensity")  # fmt: skip


# ------------------------------------------------------------------- real data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/brats2015 is absent")
def test_a_brats_case_to_isotropic_1_5_mm_and_back():
    """A real BraTS case (FLAIR + T1c, z-scored with a constant background, LPS storage):
    cropped to the brain, 1.5 mm, and its tumour labels restored onto the original grid."""
    folder = SHARED / "brats_2013_pat0001_1"
    images = [nib.load(folder / f"{name}_subtrMeanDivStd.nii.gz") for name in ("Flair", "T1c")]
    image = np.stack([np.asarray(i.dataobj, np.float32) for i in images], -1)
    labels = np.asarray(nib.load(folder / "OTMultiClass.nii.gz").dataobj).astype(np.uint8)
    brain = np.asarray(nib.load(folder / "brainmask.nii.gz").dataobj) > 0.5
    affine = images[0].affine
    case = preprocess_volume(image, affine, "MR", (1.5, 1.5, 1.5), VolumeSettings(), labels)
    box = case.geometry
    assert box.axcodes == "LPS" and case.image.shape[0] == 2
    # the crop is the brain's bounding box (the constant background is not foreground)
    k, j, i = (np.flatnonzero(brain.any(axis=a)) for a in ((0, 1), (0, 2), (1, 2)))
    assert box.crop_stop[0] - box.crop_start[0] == k[-1] - k[0] + 1
    assert box.crop_stop[1] - box.crop_start[1] == j[-1] - j[0] + 1
    assert np.prod(box.crop_shape) < 0.45 * labels.size
    restored = restore_native(case.mask, box)
    for name, region in (("whole", (1, 2, 3, 4)), ("core", (1, 3, 4)), ("enhancing", (4,))):
        dice = _dice(np.isin(restored, region), np.isin(labels, region))
        assert dice > 0.9, (name, dice)
