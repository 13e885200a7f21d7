"""radflow.dicom.convert and radflow.dicom.nifti: geometry (against dcm2niix), intensities,
failures, determinism and privacy of the NIfTI + sidecar outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from radflow import conventions as C
from radflow.dicom.convert import (
    MANIFEST_COLUMNS,
    ConversionError,
    convert_shard,
    convert_unit,
    volume_geometry,
)
from radflow.dicom.index import build_index, list_files
from radflow.dicom.nifti import read_image

from dcm2niix_reference import assert_same_grid, run_dcm2niix, run_dcm2niix_all
from dicom_factory import (
    assert_phi_free,
    asymmetric_pattern,
    build_export,
    truncate,
    write_labels,
    write_projection,
    write_volume,
)

KEY = b"radflow-test-key-0123456789abcdef"


def _rotation(deg_x: float, deg_z: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ rx
    return tuple(rot[:, 0]), tuple(rot[:, 1])


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    """Units written straight to a shard table (no index), converted with 2 processes."""
    base = tmp_path_factory.mktemp("convert")
    root = base / "dicom"
    ids = dict(patient_id="ZQXPAT1", accession="ZQXACC1")
    files: dict[str, list[Path]] = {}
    modality: dict[str, str] = {}

    def at(name):  # file names that are not substrings of the pseudonyms below
        return root / f"Zqx{name}"

    def add(name, mod, paths):
        files[name] = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
        modality[name] = mod

    add("dx_m2", "DX", write_projection(at("Doe") / "IM1", **ids,
                                        imager_pixel_spacing=(0.15, 0.1)))  # fmt: skip
    wide = asymmetric_pattern(20, 12, maximum=60000)
    add("dx_iop", "DX", write_projection(
        at("dx_iop"), **ids, pixels=wide, bits_stored=16, pixel_spacing=(0.2, 0.1),
        imager_pixel_spacing=(0.25, 0.125), orientation=(1, 0, 0, 0, 0, -1),
        position=(10, 20, 30),
    ))  # fmt: skip
    add("cr_m1", "CR", write_projection(at("cr_m1"), **ids, modality="CR",
                                        photometric="MONOCHROME1", slope=2, intercept=-100))  # fmt: skip
    add("ct_axial", "CT", write_volume(at("ct_axial"), **ids, n_slices=6, rows=12, cols=10,
                                       pixel_spacing=(0.8, 0.6), slice_gap=2.5))  # fmt: skip
    r, c = _rotation(20, 15)
    add("ct_oblique", "CT", write_volume(
        [at("ob1"), at("ob2") / "deep"], **ids, n_slices=5, rows=9, cols=11,
        pixel_spacing=(0.7, 0.9), slice_gap=3.0, row_cosines=r, col_cosines=c, slope=0.5,
        intercept=-1024.5, origin=(12.5, -7.25, 40.0),
    ))  # fmt: skip
    add("mr_sagittal", "MR", write_volume(
        at("mr"), **ids, modality="MR", n_slices=4, rows=8, cols=6, pixel_spacing=(1.1, 1.1),
        slice_gap=4.0, row_cosines=(0, 1, 0), col_cosines=(0, 0, -1), intercept=0,
    ))  # fmt: skip
    add("ct_scrambled", "CT", write_volume(at("ct_scrambled"), **ids, n_slices=5,
                                           instance_numbers=[3, 5, 1, 4, 2]))  # fmt: skip
    add("ct_uneven", "CT", write_volume(at("ct_uneven"), **ids, n_slices=4,
                                        slice_positions=[0, 2.5, 5, 10]))  # fmt: skip
    add("mr_coronal", "MR", write_volume(
        at("mr_coronal"), **ids, modality="MR", n_slices=4, rows=7, cols=9,
        pixel_spacing=(1.3, 0.7), slice_gap=3.5, row_cosines=(1, 0, 0), col_cosines=(0, 0, -1),
        intercept=0,
    ))  # fmt: skip
    tilt = np.tan(np.deg2rad(20))
    add("ct_tilt", "CT", write_volume(
        at("ct_tilt"), **ids, n_slices=5, slice_gap=2.5, intercept=0, shear=(0, tilt, 0),
        extra={"GantryDetectorTilt": "-20"},
    ))  # fmt: skip
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", [int(v) for v in np.arange(4096) * 2 + 3])
    add("ct_lut", "CT", write_volume(
        at("ct_lut"), **ids, n_slices=3,
        extra={"RescaleSlope": None, "RescaleIntercept": None,
               "ModalityLUTSequence": DicomSequence([lut])},
    ))  # fmt: skip
    add("colour", "DX", write_projection(at("colour"), **ids,
                                         extra={"PhotometricInterpretation": "PALETTE COLOR"}))  # fmt: skip
    add("corrupt", "DX", truncate(write_projection(at("corrupt"), **ids, rows=40, cols=40)))
    table = pd.DataFrame(
        [(f"ser-{name}", modality[name], p.relative_to(root).as_posix())
         for name in files for p in files[name]],
        columns=[C.SERIES_PID, C.MODALITY, C.PATH],
    )  # fmt: skip
    shard_tsv = base / "shard-000.tsv"
    table.sort_values([C.SERIES_PID, C.PATH]).to_csv(shard_tsv, sep="\t", index=False)
    out = base / "results" / "nifti"
    manifest = convert_shard(shard_tsv, root, out, threads=2, progress=False)
    return dict(root=root, files=files, out=out, manifest=manifest, shard_tsv=shard_tsv, base=base)


def nii(units, name) -> nib.Nifti1Image:
    return nib.load(units["out"] / f"ser-{name}{C.NIFTI_SUFFIX}")


def sidecar(units, name) -> dict:
    return json.loads((units["out"] / f"ser-{name}{C.SIDECAR_SUFFIX}").read_text())


def rescaled(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


# ------------------------------------------------------------------- manifest
def test_manifest(units):
    m = units["manifest"]
    assert list(m.columns) == MANIFEST_COLUMNS
    assert list(m[C.SERIES_PID]) == sorted(m[C.SERIES_PID])
    status = dict(zip(m[C.SERIES_PID], m[C.STATUS], strict=True))
    failed = {"ser-colour", "ser-corrupt"}
    assert {k for k, v in status.items() if v == C.STATUS_FAILED} == failed
    reason = dict(zip(m[C.SERIES_PID], m[C.REASON], strict=True))
    assert reason["ser-colour"] == (
        "colour image (PhotometricInterpretation PALETTE COLOR) in a grayscale study"
    )
    assert reason["ser-corrupt"]  # pydicom's complaint about the short pixel data
    assert "Zqx" not in reason["ser-corrupt"] and str(units["root"]) not in reason["ser-corrupt"]
    for pid in failed:
        assert not (units["out"] / f"{pid}{C.NIFTI_SUFFIX}").exists()
    row = m.set_index(C.SERIES_PID).loc["ser-ct_axial"]
    assert (row["ndim"], row["shape"], row["spacing_mm"], row["dtype"]) == (
        3, "10\\12\\6", "0.6\\0.8\\2.5", "int16",
    )  # fmt: skip
    row = m.set_index(C.SERIES_PID).loc["ser-dx_m2"]
    assert (row["ndim"], row["shape"], row["spacing_mm"]) == (2, "16\\24\\1", "0.1\\0.15\\1")
    on_disk = pd.read_csv(units["out"] / C.MANIFEST, sep="\t", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == MANIFEST_COLUMNS and len(on_disk) == len(m)


def test_header_fields(units):
    img = nii(units, "ct_oblique")
    h = img.header
    assert h["descrip"].item().startswith(b"radflow ")
    assert h["intent_name"].item() == b"" and h["aux_file"].item() == b""
    assert h["db_name"].item() == b""
    assert int(h["qform_code"]) == 1 and int(h["sform_code"]) == 1
    assert h.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(h.get_qform(), h.get_sform(), atol=1e-4)


# ------------------------------------------------------------------- geometry
@pytest.mark.parametrize("name", ["ct_axial", "ct_oblique", "mr_sagittal", "ct_scrambled"])
def test_geometry_from_dicom_definition(units, name):
    """Each file's pixels sit at slice k with voxel (i, j, k) at the RAS position that the
    DICOM definition gives: IPP + i * col spacing * row cosine + j * row spacing * col cosine."""
    img = nii(units, name)
    data = img.get_fdata()
    found = set()
    for path in units["files"][name]:
        ds = pydicom.dcmread(path)
        pixels = rescaled(path)
        matches = [k for k in range(data.shape[2]) if np.allclose(data[:, :, k].T, pixels)]
        assert len(matches) == 1
        k = matches[0]
        found.add(k)
        iop = np.array(ds.ImageOrientationPatient, float)
        ipp = np.array(ds.ImagePositionPatient, float)
        drow, dcol = (float(v) for v in ds.PixelSpacing)
        for i, j in [(0, 0), (data.shape[0] - 1, 0), (0, data.shape[1] - 1), (3, 2)]:
            lps = ipp + i * dcol * iop[:3] + j * drow * iop[3:]
            expected = lps * [-1, -1, 1]
            np.testing.assert_allclose(img.affine @ [i, j, k, 1], [*expected, 1], atol=1e-3)
    assert found == set(range(data.shape[2]))


def test_slices_sorted_by_position_not_instance_number(units):
    volume, spacing = read_image(units["out"] / f"ser-ct_scrambled{C.NIFTI_SUFFIX}")
    # write_volume stores 1000 + 100 * (position index) + ...: ascending along the normal
    assert np.all(np.diff(volume[:, 5, 5]) == 100)
    assert spacing == (2.5, 0.8, 0.6)


@pytest.mark.parametrize(
    "name", ["dx_iop", "ct_axial", "ct_oblique", "mr_sagittal", "mr_coronal", "ct_scrambled"]
)
def test_matches_dcm2niix(units, name, tmp_path):
    """Same voxel grid after reorientation to RAS, spacing within 1e-3 mm, voxel-centre
    world coordinates within 0.01 mm, identical rescaled values. Covers axial, oblique,
    sagittal, coronal, non-square pixels, shuffled file names and InstanceNumbers, and one
    series spread over two folders (ct_oblique)."""
    ours = nib.as_closest_canonical(nii(units, name))
    ref = nib.as_closest_canonical(run_dcm2niix(units["files"][name], tmp_path))
    assert ours.shape == ref.shape
    assert_same_grid(ours, ref)
    np.testing.assert_allclose(ours.get_fdata(), ref.get_fdata(), atol=1e-4)


def test_projection_without_orientation_matches_dcm2niix_axes(units, tmp_path):
    """dcm2niix leaves qform/sform code 0 without ImageOrientationPatient; radflow's identity
    orientation gives the same axis directions and values (not the same origin). dcm2niix
    ignores ImagerPixelSpacing (1 mm); radflow uses it when PixelSpacing is absent."""
    ours = nii(units, "dx_m2")
    ref_raw = run_dcm2niix(units["files"]["dx_m2"], tmp_path)
    assert int(ref_raw.header["qform_code"]) == 0 and int(ref_raw.header["sform_code"]) == 0
    ours_c, ref_c = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref_raw)
    assert ours_c.shape == ref_c.shape == (16, 24, 1)
    np.testing.assert_array_equal(np.sign(ours_c.affine[:3, :3]), np.sign(ref_c.affine[:3, :3]))
    np.testing.assert_allclose(ref_c.header.get_zooms(), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(ours_c.get_fdata(), ref_c.get_fdata())
    np.testing.assert_allclose(ours.header.get_zooms(), (0.1, 0.15, 1.0), atol=1e-6)
    np.testing.assert_allclose(ours.affine[:3, 3], 0)
    assert sidecar(units, "dx_m2")["spacing_source"] == "ImagerPixelSpacing"


def test_pixel_spacing_preferred_over_imager(units):
    assert sidecar(units, "dx_iop")["spacing_source"] == "PixelSpacing"
    np.testing.assert_allclose(nii(units, "dx_iop").header.get_zooms(), (0.1, 0.2, 1.0), atol=1e-6)


# ------------------------------------------- uneven spacing, gantry tilt, LUT
def test_uneven_spacing_resampled_like_dcm2niix_eq(units, tmp_path):
    """Positions 0, 2.5, 5, 10 mm: resampled at the smallest step (2.5 mm) to 5 slices by
    linear interpolation along the normal; dcm2niix's "_Eq_1" output is the same grid and,
    integers rounded to nearest in both, the same values."""
    volume, spacing = read_image(units["out"] / f"ser-ct_uneven{C.NIFTI_SUFFIX}")
    assert volume.shape == (5, 12, 10) and spacing == (2.5, 0.8, 0.6)
    # stored 1000 + 100 k + ... at positions 0, 2.5, 5, 10: the slice at 7.5 mm is halfway
    np.testing.assert_array_equal(volume[:, 5, 5] + 1024, [1040, 1140, 1240, 1290, 1340])
    meta = sidecar(units, "ct_uneven")
    assert meta["uneven_spacing"] == {
        "action": "resampled",
        "method": "linear interpolation along the slice normal at the smallest step",
        "step_mm": 2.5, "original_slices": 4, "original_step_min_mm": 2.5,
        "original_step_median_mm": 2.5, "original_step_max_mm": 5.0,
    }  # fmt: skip
    produced = run_dcm2niix_all(units["files"]["ct_uneven"], tmp_path)
    eq = [img for name, img in produced.items() if "_Eq_" in name]
    assert len(eq) == 1, sorted(produced)
    assert_same_grid(nii(units, "ct_uneven"), eq[0])
    np.testing.assert_array_equal(
        nib.as_closest_canonical(nii(units, "ct_uneven")).get_fdata(),
        nib.as_closest_canonical(eq[0]).get_fdata(),
    )


def _datasets(units, name):
    return [pydicom.dcmread(p) for p in units["files"][name]]


def test_uneven_spacing_rejected_when_configured(units):
    with pytest.raises(ConversionError, match=r"uneven slice spacing: steps of 2\.5, 5 mm"):
        volume_geometry(_datasets(units, "ct_uneven"), uneven_spacing="reject")
    row = convert_unit("ser-x", "CT", [p.relative_to(units["root"]).as_posix()
                                       for p in units["files"]["ct_uneven"]],
                       units["root"], units["base"] / "reject", uneven_spacing="reject")  # fmt: skip
    assert row[C.STATUS] == C.STATUS_FAILED
    assert "set convert.uneven_spacing: resample" in row[C.REASON]


def test_gantry_tilt_corrected_like_dcm2niix_tilt(units, tmp_path):
    """A 20 degree tilt (slice k shifted 2.5 k tan 20 mm along the column direction):
    radflow shifts each slice back onto an orthogonal grid covering all of them, the grid
    dcm2niix's "_Tilt_1" output has (same shape and affine). Values: radflow puts each
    stored row at its DICOM position (checked exactly below); dcm2niix v1.0.20260724 places
    the rows about 0.35 mm (0.43 rows) away from it on this series, so its values differ
    by up to that fraction of the row gradient (7 per row here): interpolation tolerance."""
    img = nii(units, "ct_tilt")
    meta = sidecar(units, "ct_tilt")
    assert meta["gantry_tilt"]["action"] == "corrected"
    assert meta["gantry_tilt"]["tilt_deg_from_positions"] == pytest.approx(20, abs=1e-3)
    assert meta["gantry_tilt"]["GantryDetectorTilt"] == -20
    data = img.get_fdata()
    shift_px = 2.5 * np.tan(np.deg2rad(20)) / 0.8
    assert data.shape == (10, 12 + int(np.ceil(4 * shift_px)), 5)
    # Slice k, stored row r sits at output row r + k * shift_px: check by interpolation
    # (rows 0 and 11 border the fill value).
    for k in range(5):
        for r in range(1, 11):
            position = r + k * shift_px
            lower = int(np.floor(position))
            w = position - lower
            if lower + 1 < data.shape[1]:
                value = data[5, lower, k] * (1 - w) + data[5, lower + 1, k] * w
                expected = 1000 + 100 * k + 7 * r + 5
                assert abs(value - expected) <= 0.5 + 1e-9  # output rounded to integers
    produced = run_dcm2niix_all(units["files"]["ct_tilt"], tmp_path)
    tilt = [image for name, image in produced.items() if "_Tilt_" in name]
    assert len(tilt) == 1, sorted(produced)
    assert_same_grid(img, tilt[0])
    ours_c, ref_c = nib.as_closest_canonical(img), nib.as_closest_canonical(tilt[0])
    np.testing.assert_allclose(ours_c.affine, ref_c.affine, atol=1e-4)
    inside = (ours_c.get_fdata() > 1001) & (ref_c.get_fdata() > 1001)  # both hold data
    difference = np.abs(ours_c.get_fdata() - ref_c.get_fdata())[inside]
    assert inside.sum() > 0.6 * inside.size and difference.max() <= 0.45 * 7 + 1


def test_gantry_tilt_rejected_when_configured_and_irregular_shifts_fail(units):
    with pytest.raises(ConversionError, match="gantry tilt of 20 degrees"):
        volume_geometry(_datasets(units, "ct_tilt"), gantry_tilt="reject")
    datasets = _datasets(units, "ct_axial")
    position = [float(v) for v in datasets[2].ImagePositionPatient]
    datasets[2].ImagePositionPatient = [position[0] + 3, *position[1:]]  # one slice moved
    with pytest.raises(ConversionError, match="shifted in-plane irregularly"):
        volume_geometry(datasets)


def test_modality_lut_applied(units, tmp_path):
    """The Modality LUT (value -> 2 value + 3) replaces the rescale. dcm2niix
    v1.0.20260724 ignores ModalityLUTSequence and writes stored values: same grid, and its
    values mapped through the LUT equal radflow's."""
    img = nii(units, "ct_lut")
    meta = sidecar(units, "ct_lut")
    assert meta["modality_lut_applied"] is True and meta["rescale_applied"] is False
    ref = run_dcm2niix(units["files"]["ct_lut"], tmp_path)
    assert_same_grid(img, ref)
    ours_c, ref_c = nib.as_closest_canonical(img), nib.as_closest_canonical(ref)
    np.testing.assert_array_equal(ours_c.get_fdata(), 2 * ref_c.get_fdata() + 3)
    assert img.get_data_dtype() == np.int16


# ---------------------------------------------------------------- intensities
def test_read_image_round_trip_2d(units):
    path = units["files"]["dx_m2"][0]
    pixels = pydicom.dcmread(path).pixel_array
    image, spacing = read_image(units["out"] / f"ser-dx_m2{C.NIFTI_SUFFIX}")
    assert image.dtype == np.float32 and image.shape == (24, 16)
    assert image[0, 0] == pixels[0, 0] == 4000  # top-left of the DICOM image
    np.testing.assert_array_equal(image, pixels)
    np.testing.assert_array_equal(image, asymmetric_pattern(24, 16))
    assert spacing == (0.15, 0.1)


def test_read_image_round_trip_3d(units):
    image, spacing = read_image(units["out"] / f"ser-ct_axial{C.NIFTI_SUFFIX}")
    assert image.shape == (6, 12, 10) and spacing == (2.5, 0.8, 0.6)
    rr, cc = np.mgrid[0:12, 0:10]
    for k in range(6):
        expected = 1000 + 100 * k + 7 * rr + cc - 1024.0
        expected[:2, :3] += 1
        np.testing.assert_array_equal(image[k], expected)


def test_rescale_and_dtypes(units):
    axial = nii(units, "ct_axial")
    assert axial.get_data_dtype() == np.int16 and axial.get_fdata().min() < 0  # HU
    oblique = nii(units, "ct_oblique")
    assert oblique.get_data_dtype() == np.float32
    values = np.sort(np.unique(oblique.get_fdata()))
    assert values[0] == 1001 * 0.5 - 1024.5  # the marked corner of slice 0
    assert 1003 * 0.5 - 1024.5 in values  # a half-integer survives: float, not rounded
    wide = nii(units, "dx_iop")
    assert wide.get_data_dtype() == np.int32 and wide.get_fdata().max() == 60000
    assert sidecar(units, "ct_oblique")["rescale_applied"] is True
    assert sidecar(units, "dx_m2")["rescale_applied"] is False


def test_monochrome1_inverted(units):
    path = units["files"]["cr_m1"][0]
    stored = pydicom.dcmread(path).pixel_array.astype(float)
    image, _ = read_image(units["out"] / f"ser-cr_m1{C.NIFTI_SUFFIX}")
    # 12 bits unsigned, rescaled by 2x - 100: representable [-100, 8090]
    np.testing.assert_array_equal(image, (-100 + 8090) - (2 * stored - 100))
    assert image[0, 0] < image[-1, -1]  # the stored-bright (4000) corner is now dark
    meta = sidecar(units, "cr_m1")
    assert meta["inverted_monochrome1"] is True
    assert meta["PhotometricInterpretation"] == "MONOCHROME1"
    assert meta["RescaleSlope"] == 2.0 and meta["RescaleIntercept"] == -100.0
    assert nii(units, "cr_m1").get_data_dtype() == np.int16


def test_sidecar_content(units):
    meta = sidecar(units, "ct_axial")
    assert meta["series_pid"] == "ser-ct_axial" and meta["n_files"] == 6
    assert meta["Modality"] == "CT" and meta["ConvolutionKernel"] == "B30f"
    assert meta["radflow_version"] and meta["spacing_mm"] == [0.6, 0.8, 2.5]
    for key in ("PatientName", "PatientID", "StudyInstanceUID", "InstitutionName",
                "StudyDate", "ImagePositionPatient", "SeriesDescription"):  # fmt: skip
        assert key not in meta


# ------------------------------------------------------------ determinism, PHI
def test_deterministic(units, tmp_path):
    again = tmp_path / "again"
    convert_shard(units["shard_tsv"], units["root"], again, threads=1, progress=False)
    first = {p.name: p.read_bytes() for p in units["out"].iterdir()}
    second = {p.name: p.read_bytes() for p in again.iterdir()}
    assert first == second


def test_outputs_hold_no_phi(units):
    assert_phi_free(units["out"], list_files(units["root"]))


def test_index_then_convert_end_to_end(tmp_path):
    """The full path: messy export -> index -> every shard converted, results PHI-free."""
    info = build_export(tmp_path / "dicom")
    labels = write_labels(tmp_path / "labels.csv", info["labels"], ["AccessionNumber", "label"])
    index = build_index(info["root"], labels, key=KEY, n_shards=2, progress=False)
    results, private = tmp_path / "results", tmp_path / "private"
    index.write(results / "index", private)
    statuses = []
    for k in range(2):
        shard = private / C.SHARD_INDEX_DIR / f"{C.shard_name(k)}.tsv"
        manifest = convert_shard(shard, info["root"], results / "nifti" / C.shard_name(k),
                                 progress=False)  # fmt: skip
        statuses += list(manifest[C.STATUS])
    assert statuses == [C.STATUS_OK] * len(index.series)
    assert_phi_free(results, list_files(info["root"]))
    volume, spacing = read_image(
        results / "nifti" / C.shard_name(index.series.set_index(C.SERIES_PID).loc[
            C.pseudonym(KEY, "ser", info["C"]["mr_series"]), C.SHARD])
        / f"{C.pseudonym(KEY, 'ser', info['C']['mr_series'])}{C.NIFTI_SUFFIX}"
    )  # fmt: skip
    assert volume.shape == (4, 12, 10) and spacing == (2.5, 0.8, 0.6)


def test_empty_shard(tmp_path):
    shard = tmp_path / "shard-001.tsv"
    pd.DataFrame(columns=[C.SERIES_PID, C.MODALITY, C.PATH]).to_csv(shard, sep="\t", index=False)
    manifest = convert_shard(shard, tmp_path, tmp_path / "out", progress=False)
    assert manifest.empty and list(manifest.columns) == MANIFEST_COLUMNS
    assert (tmp_path / "out" / C.MANIFEST).read_text() == "\t".join(MANIFEST_COLUMNS) + "\n"


def test_convert_settings_checked_by_schema_and_config(tmp_path):
    """convert.uneven_spacing / gantry_tilt: schema defaults, and a clear error otherwise."""
    import yaml
    from snakemake.utils import validate

    from radflow.config import ConfigError, check_config

    root = Path(__file__).parents[1]
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    del config["convert"]
    validate(config, str(root / "config" / "schema.yaml"), set_default=True)
    assert config["convert"]["uneven_spacing"] == "resample"
    assert config["convert"]["gantry_tilt"] == "correct"
    config["convert"]["gantry_tilt"] = "straighten"
    with pytest.raises(ConfigError, match="convert.gantry_tilt: 'straighten' is not one of"):
        check_config(config)


@pytest.mark.parametrize(
    ("implicit", "little_endian"), [(True, True), (False, True), (False, False)]
)
def test_raw_header_values_read_as_pydicom_reads_them(implicit, little_endian):
    """convert's quick parse of raw DS/US/CS elements (`_get`) gives the values pydicom's
    `ds.get` gives, including the cases it hands back to pydicom (empty, non-numeric,
    several values, values with padding)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from radflow.dicom.convert import _attr, _get

    raw = {
        "ImagePositionPatient": b" -12.5\\3e2\\+0.25 ",
        "PixelSpacing": b"0.7\\0.7\x00",
        "ImageOrientationPatient": b"1\\0\\0\\0\\\\0",  # an empty value
        "RescaleSlope": b"abc ",  # not a number: pydicom decides
        "RescaleIntercept": b"-1024",
        "SliceThickness": b"",
        "Rows": (512).to_bytes(2, "little" if little_endian else "big"),
        "Columns": (7).to_bytes(2, "little" if little_endian else "big") * 2,  # two values
        "PhotometricInterpretation": b"MONOCHROME2 ",
        "ImageType": b"ORIGINAL\\PRIMARY",
    }
    vrs = {"Rows": "US", "Columns": "US", "PhotometricInterpretation": "CS", "ImageType": "CS"}

    def dataset() -> Dataset:
        elements = {}
        for keyword, value in raw.items():
            tag = Tag(keyword)
            vr = None if implicit else vrs.get(keyword, "DS")
            elements[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, little_endian)
        return Dataset(elements)

    for keyword in [*raw, "SpacingBetweenSlices"]:
        try:
            expected = dataset().get(keyword, "absent")
        except ValueError as exc:  # pydicom itself fails on some values: so must _get
            with pytest.raises(type(exc)):
                _get(dataset(), keyword, "absent")
            continue
        got = _get(dataset(), keyword, "absent")
        if isinstance(expected, (list, pydicom.multival.MultiValue)):
            assert list(got) == list(expected), keyword
        else:
            assert got == expected and type(got) is not bytes, keyword
    with pytest.raises(AttributeError):
        _attr(dataset(), "SpacingBetweenSlices")
    assert _attr(dataset(), "Rows") == 512
