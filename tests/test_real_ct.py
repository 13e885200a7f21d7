"""Real chest CT (../shared/data/lidc, three LIDC-IDRI slabs; skipped when absent)
through radflow's DICOM conversion, as the workflow runs it: each slab's converted
image has the geometry its DICOM headers state, and every LUNA16 nodule
(luna16/annotations.csv, world mm, LPS) whose centre lies in a slab maps, through
`radflow.images.world_to_index` and `radflow.geometry.world_to_preprocessed`, onto soft
tissue surrounded by aerated lung."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from test_real_dicom import N_SHARDS, _dcm2niix, _headers, _index_and_convert

from radflow import conventions as C
from radflow.dicom.index import read_shard_files
from radflow.geometry import (
    CaseGeometry,
    canonical_shape,
    reorient_to_canonical,
    world_to_preprocessed,
)
from radflow.images import read_info, world_to_index

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIDC, LUNA16 = DATA / "lidc", DATA / "luna16"
#: Soft tissue (nodule) against aerated lung parenchyma (~ -850 HU).
NODULE_MIN_HU = -400
LUNG_MAX_HU = -700

pytestmark = pytest.mark.skipif(
    not (LIDC.is_dir() and LUNA16.is_dir()),
    reason=f"LIDC-IDRI slabs or LUNA16 annotations not found under {DATA} (the shared data "
    "folder beside the project; see ../shared/data/README.md)",
)


@pytest.fixture(scope="module")
def slabs(tmp_path_factory) -> dict[str, dict]:
    """{SeriesInstanceUID: converted NIfTI path, its DICOM slices (inferior first)} of the
    three slabs, converted by `_index_and_convert` (index + convert_shard, as the
    workflow does)."""
    _dcm2niix()  # skips without the binary: the slabs take the dcm2niix route
    base = tmp_path_factory.mktemp("lidc")
    _, _, results, private = _index_and_convert(LIDC, _headers(LIDC), base)
    shards = pd.concat([read_shard_files(private / C.SHARD_INDEX_DIR / f"{C.shard_name(k)}.tsv")
                        for k in range(N_SHARDS)])  # fmt: skip
    out = {}
    for series_pid, files in shards.groupby(C.SERIES_PID):
        slices = sorted((pydicom.dcmread(LIDC / p) for p in files[C.PATH]),
                        key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
        nifti = next(results.rglob(f"{series_pid}{C.NIFTI_SUFFIX}"))
        out[str(slices[0].SeriesInstanceUID)] = dict(nifti=nifti, slices=slices)
    return out


def _nodules_in(slabs) -> list[tuple[str, pd.Series]]:
    """(series uid, annotations.csv row) of every LUNA16 nodule whose centre lies in a
    slab (within half a voxel of its outer slices)."""
    luna = pd.read_csv(LUNA16 / "annotations.csv")
    found = []
    for uid, slab in slabs.items():
        info = read_info(str(slab["nifti"]))
        for _, row in luna[luna["seriesuid"] == uid].iterrows():
            index = world_to_index(info, row[["coordX", "coordY", "coordZ"]].to_numpy(float))
            if np.all(index >= -0.5) and np.all(index <= np.asarray(info.size) - 0.5):
                found.append((uid, row))
    return found


def test_every_slab_converts_with_its_dicom_geometry(slabs):
    """Each converted slab (dcm2niix route: rows stored bottom-up, so ITK's second
    direction is the negated column cosine) holds every DICOM pixel where its header puts
    it: pixel (column c, row r) of slice k, at ImagePositionPatient_k + c * column spacing
    * row cosine + r * row spacing * column cosine, maps through `world_to_index` onto an
    integer voxel with the pixel's HU; spacing is PixelSpacing and the position step."""
    assert len(slabs) == 3
    rng = np.random.default_rng(0)
    for slab in slabs.values():
        info, slices = read_info(str(slab["nifti"])), slab["slices"]
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(slab["nifti"])))  # (k, j, i)
        first = slices[0]
        row_mm, col_mm = (float(v) for v in first.PixelSpacing)
        iop = np.array([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
        assert info.size == (int(first.Columns), int(first.Rows), len(slices))
        assert 11 <= len(slices) <= 16
        np.testing.assert_allclose(info.spacing, [col_mm, row_mm, np.diff(positions @ normal).mean()],
                                   atol=1e-3)  # fmt: skip
        np.testing.assert_allclose(np.abs(np.reshape(info.direction, (3, 3))),
                                   np.abs(np.column_stack([iop[:3], iop[3:], normal])), atol=1e-6)  # fmt: skip
        corners = [(c, r) for c in (0, first.Columns - 1) for r in (0, first.Rows - 1)]
        for k, ds in enumerate(slices):
            pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for c, r in corners + [tuple(v) for v in rng.integers(0, 512, size=(20, 2))]:
                world = positions[k] + c * col_mm * iop[:3] + r * row_mm * iop[3:]
                index = world_to_index(info, world)
                np.testing.assert_allclose(index, np.round(index), atol=1e-3)
                i, j, kk = np.round(index).astype(int)
                assert hu[kk, j, i] == pixels[r, c]


def _hu_around(nifti: Path, world: np.ndarray, diameter_mm: float):
    """(HU of the nodule's centre voxel, max HU in the 3x3x1 voxels around it, a third of
    the radius apart at most; median HU on a ring in the centre's slice at 1.5 radii + 5 mm,
    outside the nodule)."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))  # (slice, row, column)
    info = read_info(str(nifti))
    spacing = np.asarray(info.spacing)
    i, j, k = np.round(world_to_index(info, world)).astype(int)
    step = max(1, int(diameter_mm / 6 / spacing[0]))
    centre = volume[k, j - step : j + step + 1 : step, i - step : i + step + 1 : step]
    ring_mm = 1.5 * diameter_mm / 2 + 5.0
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    cols = np.round(i + ring_mm / spacing[0] * np.cos(angles)).astype(int)
    rows = np.round(j + ring_mm / spacing[1] * np.sin(angles)).astype(int)
    return float(volume[k, j, i]), float(centre.max()), float(np.median(volume[k, rows, cols]))


def test_luna16_nodules_map_onto_soft_tissue_in_aerated_lung(slabs):
    """The LUNA16 nodules whose centres lie in the slabs (LIDC-IDRI-0001's one and the
    largest of -0003's three; the other two lie 7-10 mm above that slab): > -400 HU at
    the mapped centre voxel and as the max of 3x3x1 voxels (measured: 91 and 122 HU;
    -22 and 199 HU), lung < -700 HU on a ring around (-832, -847 HU)."""
    found = _nodules_in(slabs)
    assert sorted(uid[-6:] for uid, _ in found) == ["003264", "603192"]
    for uid, row in found:
        world = row[["coordX", "coordY", "coordZ"]].to_numpy(float)
        centre_hu, nodule_hu, lung_hu = _hu_around(slabs[uid]["nifti"], world, row["diameter_mm"])
        print(
            f"{uid[-6:]} {world.round(1)} d={row['diameter_mm']:.1f} mm: centre "
            f"{centre_hu:.0f} HU, 3x3x1 max {nodule_hu:.0f} HU, lung ring {lung_hu:.0f} HU"
        )
        assert centre_hu > NODULE_MIN_HU and nodule_hu > NODULE_MIN_HU
        assert lung_hu < LUNG_MAX_HU


def test_world_to_preprocessed_reaches_the_same_voxel(slabs):
    """Through `world_to_preprocessed` (a whole-image, unresampled CaseGeometry on the
    NIfTI affine) each nodule centre lands on the voxel `world_to_index` finds, in the
    reoriented array, with the same HU."""
    for uid, row in _nodules_in(slabs):
        image = nib.load(slabs[uid]["nifti"])
        shape = image.shape[:3]
        zyx = canonical_shape(shape, image.affine)
        geometry = CaseGeometry(shape, image.affine, (0, 0, 0), zyx, zyx)
        world = row[["coordX", "coordY", "coordZ"]].to_numpy(float)
        z, y, x = np.round(world_to_preprocessed(world, geometry, frame="LPS")[0]).astype(int)
        canonical = reorient_to_canonical(np.asarray(image.dataobj), image.affine)
        itk = sitk.ReadImage(str(slabs[uid]["nifti"]))
        i, j, k = np.round(world_to_index(read_info(str(slabs[uid]["nifti"])), world)).astype(int)
        assert canonical[z, y, x] == sitk.GetArrayFromImage(itk)[k, j, i]


def test_world_voxel_world_round_trip_within_half_a_voxel(slabs):
    """World points spread over each slab (and the nodule centres): the nearest voxel of
    `world_to_index`, taken back to world by ITK, is within half a voxel on every axis;
    the continuous index equals ITK's own."""
    rng = np.random.default_rng(0)
    for uid, slab in slabs.items():
        info = read_info(str(slab["nifti"]))
        image = sitk.ReadImage(str(slab["nifti"]))
        size, spacing = np.asarray(info.size), np.asarray(info.spacing)
        indices = rng.uniform(-0.49, size - 0.51, size=(200, 3))
        points = [np.array(image.TransformContinuousIndexToPhysicalPoint(v)) for v in indices]
        points += [r[["coordX", "coordY", "coordZ"]].to_numpy(float)
                   for u, r in _nodules_in(slabs) if u == uid]  # fmt: skip
        for world in points:
            index = world_to_index(info, world)
            np.testing.assert_allclose(
                index, image.TransformPhysicalPointToContinuousIndex(world), atol=1e-6
            )
            back = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in np.round(index)]))
            direction = np.reshape(info.direction, (3, 3))
            assert np.all(np.abs(direction.T @ (back - world)) / spacing <= 0.5 + 1e-9)
