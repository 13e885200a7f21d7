"""radflow.dicom.convert and radflow.dicom.nifti: routes (dcm2niix's output kept bit for
bit, radflow's own reader for projection radiographs and what dcm2niix gets wrong),
geometry, intensities, failures, determinism and privacy of the NIfTI + sidecar outputs."""

from __future__ import annotations

import gzip
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
from radflow.dicom import radflow_version
from radflow.dicom.convert import (
    ENGINE_SIDECAR_FIELDS,
    MANIFEST_COLUMNS,
    convert_shard,
    convert_unit,
)
from radflow.dicom.index import build_index
from radflow.dicom.nifti import read_image
from radflow.dicom.reader import ConversionError, load_slices, stack_geometry
from radflow.files import list_files

from dcm2niix_reference import (
    assert_engine_output,
    assert_same_grid,
    raw_nifti,
    run_dcm2niix,
    run_dcm2niix_all,
)
from dicom_factory import (
    assert_phi_free,
    asymmetric_pattern,
    build_export,
    new_uid,
    truncate,
    write_labels,
    write_projection,
    write_volume,
    write_volumes,
)

KEY = b"radflow-test-key-0123456789abcdef"
ACQUISITION_TIME = "134409.25"  # dcm2niix writes it into the NIfTI descrip

#: The route of each unit of the fixture (`choose_route`); a colour image is refused
#: whatever its route.
ROUTES = {
    "dx_m2": "radflow", "dx_iop": "radflow", "cr_m1": "radflow", "ct_lut": "radflow",
    "corrupt": "radflow", "ct_axial": "dcm2niix",
    "ct_oblique": "dcm2niix", "mr_sagittal": "dcm2niix", "ct_scrambled": "dcm2niix",
    "ct_uneven": "dcm2niix", "mr_coronal": "dcm2niix", "ct_tilt": "dcm2niix",
}  # fmt: skip
DCM2NIIX_UNITS = sorted(k for k, v in ROUTES.items() if v == "dcm2niix")


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
                                       pixel_spacing=(0.8, 0.6), slice_gap=2.5,
                                       extra={"AcquisitionTime": ACQUISITION_TIME}))  # fmt: skip
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
    route = dict(zip(m[C.SERIES_PID], m["route"], strict=True))
    del route["ser-colour"]
    assert route == {f"ser-{name}": r for name, r in ROUTES.items()}
    row = m.set_index(C.SERIES_PID).loc["ser-ct_axial"]
    assert (row["ndim"], row["shape"], row["spacing_mm"], row["dtype"]) == (
        3, "10\\12\\6", "0.6\\0.8\\2.5", "int16",
    )  # fmt: skip
    row = m.set_index(C.SERIES_PID).loc["ser-dx_m2"]
    assert (row["ndim"], row["shape"], row["spacing_mm"]) == (2, "16\\24\\1", "0.1\\0.15\\1")
    on_disk = pd.read_csv(units["out"] / C.MANIFEST, sep="\t", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == MANIFEST_COLUMNS and len(on_disk) == len(m)


@pytest.mark.parametrize("name", ["ct_oblique", "dx_iop"])
def test_header_fields(units, name):
    img = nii(units, name)
    h = img.header
    assert h["descrip"].item() == f"radflow {radflow_version()}".encode()
    assert h["intent_name"].item() == b"" and h["aux_file"].item() == b""
    assert h["db_name"].item() == b""
    assert int(h["qform_code"]) == 1 and int(h["sform_code"]) == 1
    assert h.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(h.get_qform(), h.get_sform(), atol=1e-4)


@pytest.mark.parametrize("name", DCM2NIIX_UNITS)
def test_dcm2niix_route_keeps_engine_output(units, name, tmp_path):
    """A dcm2niix-route unit is dcm2niix's image bit for bit (voxel bytes, data type,
    scl_slope/scl_inter, qform/sform and every other header field) except the free-text
    fields radflow replaces, where dcm2niix writes the acquisition time. The tilted and
    unevenly spaced units are dcm2niix's corrected versions ("_Tilt_1", "_Eq_1")."""
    produced = run_dcm2niix_all(units["files"][name], tmp_path)
    variant = {"ct_tilt": "_Tilt_1", "ct_uneven": "_Eq_1"}.get(name)
    chosen = [img for n, img in produced.items() if variant is None or variant in n]
    assert len(chosen) == 1, sorted(produced)
    ref_path = chosen[0].get_filename()
    assert_engine_output(units["out"] / f"ser-{name}{C.NIFTI_SUFFIX}", ref_path)
    ref_header, _ = raw_nifti(ref_path)
    assert b"Time=" in ref_header["descrip"].item()  # replaced by "radflow <version>"
    if name == "ct_axial":
        assert ACQUISITION_TIME[:6].encode() in ref_header["descrip"].item()


# ------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "name", ["ct_axial", "ct_oblique", "mr_sagittal", "mr_coronal", "ct_scrambled", "dx_iop"]
)
def test_geometry_from_dicom_definition(units, name):
    """Every stored pixel (row r, column c) of every file lands on a voxel centre of the
    NIfTI, at the RAS position the DICOM definition gives (IPP + c * column spacing * row
    cosine + r * row spacing * column cosine, x and y negated), holding its rescaled value;
    every voxel is some file's pixel. Independent of how either route orders the axes."""
    img = nii(units, name)
    data = img.get_fdata()
    inverse = np.linalg.inv(img.affine)
    hits = np.zeros(data.shape[:3], int)
    for path in units["files"][name]:
        ds = pydicom.dcmread(path)
        pixels = rescaled(path)
        iop = np.array(ds.ImageOrientationPatient, float)
        ipp = np.array(ds.ImagePositionPatient, float)
        drow, dcol = (float(v) for v in ds.PixelSpacing)
        rr, cc = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
        lps = ipp + cc[..., None] * dcol * iop[:3] + rr[..., None] * drow * iop[3:]
        ras = np.concatenate([lps * [-1, -1, 1], np.ones(rr.shape + (1,))], axis=-1)
        voxel = ras @ inverse.T
        index = np.rint(voxel[..., :3]).astype(int)
        np.testing.assert_allclose(voxel[..., :3], index, atol=1e-3)
        i, j, k = index[..., 0], index[..., 1], index[..., 2]
        np.testing.assert_array_equal(data[i, j, k], pixels)
        np.add.at(hits, (i, j, k), 1)
    assert (hits == 1).all()


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
def _datasets(units, name):
    return load_slices([str(p) for p in units["files"][name]])


def _rels(units, name):
    return [p.relative_to(units["root"]).as_posix() for p in units["files"][name]]


def test_uneven_spacing_resampled_by_dcm2niix_eq(units, tmp_path):
    """Positions 0, 2.5, 5, 10 mm: dcm2niix's "_Eq_1" version (resampled at the smallest
    step, 2.5 mm, to 5 slices by linear interpolation along the normal) is the unit, bit for
    bit (test_dcm2niix_route_keeps_engine_output), and the sidecar says so."""
    volume, spacing = read_image(units["out"] / f"ser-ct_uneven{C.NIFTI_SUFFIX}")
    assert volume.shape == (5, 12, 10) and spacing == (2.5, 0.8, 0.6)
    # stored 1000 + 100 k + 7 r + c - 1024 at 0, 2.5, 5, 10 mm; read_image's RAS order flips
    # rows and columns of this LPS-axial stack: [k, 5, 5] is row 6, column 4. The slice at
    # 7.5 mm is halfway between the last two.
    np.testing.assert_array_equal(volume[:, 5, 5] + 1024, [1046, 1146, 1246, 1296, 1346])
    meta = sidecar(units, "ct_uneven")
    assert meta["uneven_spacing"] == "resampled to equal spacing by dcm2niix (_Eq)"
    assert meta["dcm2niix_suffix"] == "Eq" and meta["route"] == "dcm2niix"
    produced = run_dcm2niix_all(units["files"]["ct_uneven"], tmp_path)
    eq = [img for name, img in produced.items() if "_Eq_" in name]
    assert len(eq) == 1, sorted(produced)
    assert_same_grid(nii(units, "ct_uneven"), eq[0])
    np.testing.assert_array_equal(nii(units, "ct_uneven").get_fdata(), eq[0].get_fdata())


def test_uneven_spacing_rejected_when_configured(units):
    """With convert.uneven_spacing: reject the unit fails with the reason; radflow's own
    reader never resamples: it refuses the stack."""
    row = convert_unit("ser-x", "CT", _rels(units, "ct_uneven"), units["root"],
                       units["base"] / "reject", uneven_spacing="reject")  # fmt: skip
    assert (row[C.STATUS], row["route"]) == (C.STATUS_FAILED, "dcm2niix")
    assert row[C.REASON] == (
        "uneven slice spacing (dcm2niix wrote an equally spaced version); set "
        "convert.uneven_spacing: resample to use it"
    )
    assert not list((units["base"] / "reject").glob("ser-x*"))
    with pytest.raises(ConversionError, match=r"^uneven slice spacing \(2\.5, 5 mm\), which "):
        stack_geometry(_datasets(units, "ct_uneven"))
    # the even series passes both settings untouched
    row = convert_unit("ser-y", "CT", _rels(units, "ct_axial"), units["root"],
                       units["base"] / "reject", uneven_spacing="reject", gantry_tilt="reject")  # fmt: skip
    assert row[C.STATUS] == C.STATUS_OK
    assert (units["base"] / "reject" / f"ser-y{C.NIFTI_SUFFIX}").read_bytes() == (
        units["out"] / f"ser-ct_axial{C.NIFTI_SUFFIX}"
    ).read_bytes()


def test_gantry_tilt_corrected_by_dcm2niix_tilt(units, tmp_path):
    """A 20 degree tilt (slice k shifted 2.5 k tan 20 mm along the column direction):
    dcm2niix's "_Tilt_1" version is the unit, bit for bit: an orthogonal grid covering
    every slice (12 rows + ceil(4 * 1.137 rows of shift)), and the sidecar says so."""
    img = nii(units, "ct_tilt")
    meta = sidecar(units, "ct_tilt")
    assert meta["gantry_tilt"] == "corrected by dcm2niix (_Tilt)"
    assert meta["dcm2niix_suffix"] == "Tilt" and meta["route"] == "dcm2niix"
    assert meta["GantryDetectorTilt"] == -20
    shift_px = 2.5 * np.tan(np.deg2rad(20)) / 0.8
    assert img.shape == (10, 12 + int(np.ceil(4 * shift_px)), 5)
    canonical = nib.as_closest_canonical(img).affine[:3, :3]
    np.testing.assert_allclose(canonical, np.diag([0.6, 0.8, 2.5]), atol=1e-5)  # no shear
    produced = run_dcm2niix_all(units["files"]["ct_tilt"], tmp_path)
    tilt = [image for name, image in produced.items() if "_Tilt_" in name]
    assert len(tilt) == 1, sorted(produced)
    assert_same_grid(img, tilt[0])
    np.testing.assert_array_equal(img.affine, tilt[0].affine)
    np.testing.assert_array_equal(img.get_fdata(), tilt[0].get_fdata())


def test_gantry_tilt_rejected_when_configured_and_refused_by_radflow_reader(units):
    row = convert_unit("ser-x", "CT", _rels(units, "ct_tilt"), units["root"],
                       units["base"] / "reject_tilt", gantry_tilt="reject")  # fmt: skip
    assert (row[C.STATUS], row["route"]) == (C.STATUS_FAILED, "dcm2niix")
    assert row[C.REASON] == (
        "gantry tilt (dcm2niix wrote a tilt-corrected version); set convert.gantry_tilt: "
        "correct to use it"
    )
    assert not list((units["base"] / "reject_tilt").glob("ser-x*"))
    tilt_message = r"shifted in-plane along the stack \(gantry tilt\), which radflow's own"
    with pytest.raises(ConversionError, match=tilt_message):
        stack_geometry(_datasets(units, "ct_tilt"))
    datasets = _datasets(units, "ct_axial")
    position = [float(v) for v in datasets[2].ImagePositionPatient]
    datasets[2].ImagePositionPatient = [position[0] + 3, *position[1:]]  # one slice moved
    with pytest.raises(ConversionError, match=tilt_message):
        stack_geometry(datasets)
    assert stack_geometry(_datasets(units, "ct_axial")).spacing == pytest.approx((0.6, 0.8, 2.5))


def test_radflow_route_that_needs_dcm2niix_fails_naming_both_limits(tmp_path):
    """A MONOCHROME1 CT (radflow's route: dcm2niix does not invert it) with uneven slices
    (which only dcm2niix resamples) fails with a reason naming both limits, and a
    MONOCHROME1 CT with repeated positions (a 4D series) likewise; the regular MONOCHROME1
    stack converts inverted."""
    root = tmp_path / "dicom"
    ids = dict(patient_id="ZQXPAT2", accession="ZQXACC2")
    m1 = {"PhotometricInterpretation": "MONOCHROME1"}
    uneven = write_volume(root / "uneven", **ids, n_slices=4, slice_positions=[0, 2.5, 5, 10],
                          extra=m1)  # fmt: skip
    regular = write_volume(root / "regular", **ids, n_slices=3, extra=m1)
    series, study = new_uid(), new_uid()
    repeated = [p for v in write_volumes(root / "4d", [m1, m1], series_uid=series,
                                         study_uid=study, **ids) for p in v]  # fmt: skip
    rows = {}
    for name, files in (("uneven", uneven), ("regular", regular), ("4d", repeated)):
        rels = [p.relative_to(root).as_posix() for p in files]
        rows[name] = convert_unit(f"ser-{name}", "CT", rels, root, tmp_path / "out")
        assert rows[name]["route"] == "radflow"
    why = "; dcm2niix cannot be used: MONOCHROME1: dcm2niix does not invert it"
    assert rows["uneven"][C.STATUS] == C.STATUS_FAILED
    assert rows["uneven"][C.REASON] == (
        "uneven slice spacing (2.5, 5 mm), which radflow's own reader does not resample" + why
    )
    assert rows["4d"][C.STATUS] == C.STATUS_FAILED
    assert rows["4d"][C.REASON].endswith("share a position (a 4D series), which radflow's own "
                                         "reader does not stack" + why)  # fmt: skip
    assert rows["regular"][C.STATUS] == C.STATUS_OK
    volume, _ = read_image(tmp_path / "out" / f"ser-regular{C.NIFTI_SUFFIX}")
    # 12 bits, rescaled by x - 1024: representable [-1024, 3071]; stored 1000 + 100 k + ...
    assert volume[0, 0, 0] == (-1024 + 3071) - (1000 + 7 * 11 + 9 - 1024)


def test_four_dimensional_unit(tmp_path):
    """Two time points at the same positions are one unit: dcm2niix's 4D image (x, y, z,
    volume), ndim 4 in the manifest, volumes in acquisition order; read_image refuses it."""
    root = tmp_path / "dicom"
    ids = dict(patient_id="ZQXPAT3", accession="ZQXACC3")
    volumes = [{"AcquisitionNumber": 1, "TemporalPositionIdentifier": 1},
               {"AcquisitionNumber": 2, "TemporalPositionIdentifier": 2}]  # fmt: skip
    files = [p for v in write_volumes(root / "Zqx4d", volumes, series_uid=new_uid(),
                                      study_uid=new_uid(), modality="MR", **ids) for p in v]  # fmt: skip
    row = convert_unit("ser-4d", "MR", [p.relative_to(root).as_posix() for p in files], root,
                       tmp_path / "out")  # fmt: skip
    assert (row[C.STATUS], row["route"], row["ndim"]) == (C.STATUS_OK, "dcm2niix", 4)
    assert row["shape"] == "10\\12\\3\\2" and row["spacing_mm"] == "0.6\\0.8\\2.5"
    meta = json.loads((tmp_path / "out" / f"ser-4d{C.SIDECAR_SUFFIX}").read_text())
    assert meta["ndim"] == 4 and meta["shape"] == [10, 12, 3, 2]
    img = nib.load(tmp_path / "out" / f"ser-4d{C.NIFTI_SUFFIX}")
    data = img.get_fdata()
    # write_volumes: volume v adds 300 to every stored value
    np.testing.assert_array_equal(data[..., 1] - data[..., 0], 300)
    (tmp_path / "ref").mkdir()
    ref = run_dcm2niix(files, tmp_path / "ref")
    assert_engine_output(tmp_path / "out" / f"ser-4d{C.NIFTI_SUFFIX}", ref.get_filename())
    with pytest.raises(ValueError, match="2-volume 4D image"):
        read_image(tmp_path / "out" / f"ser-4d{C.NIFTI_SUFFIX}")


def test_modality_lut_applied(units, tmp_path):
    """The Modality LUT (value -> 2 value + 3) replaces the rescale. dcm2niix
    v1.0.20260724 ignores ModalityLUTSequence and writes stored values: same grid, and its
    values mapped through the LUT equal radflow's."""
    img = nii(units, "ct_lut")
    meta = sidecar(units, "ct_lut")
    assert meta["modality_lut_applied"] is True and meta["rescale_applied"] is False
    assert (meta["route"], meta["route_reason"]) == ("radflow", "Modality LUT: dcm2niix ignores it")
    assert meta["dcm2niix_version"].startswith("v1.0.")  # in every sidecar, whatever the route
    assert "dcm2niix" not in meta and "dcm2niix_suffix" not in meta
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


@pytest.mark.parametrize("name", ["ct_axial", "ct_lut"])
def test_read_image_round_trip_3d(units, name):
    """Either route, read back in RAS order (k inferior->superior, j posterior->anterior,
    i left->right): this LPS-axial stack (rows run posterior, columns run left) comes back
    with rows and columns reversed, slices in position order, values rescaled."""
    image, spacing = read_image(units["out"] / f"ser-{name}{C.NIFTI_SUFFIX}")
    n = 6 if name == "ct_axial" else 3
    assert image.shape == (n, 12, 10) and spacing == (2.5, 0.8, 0.6)
    rr, cc = np.mgrid[0:12, 0:10]
    for k in range(n):
        stored = 1000 + 100 * k + 7 * rr + cc
        stored[:2, :3] += 1
        expected = stored - 1024.0 if name == "ct_axial" else 2 * stored + 3.0  # LUT
        np.testing.assert_array_equal(image[k], expected[::-1, ::-1])


def test_rescale_and_dtypes(units):
    """dcm2niix's route stores the DICOM values with the rescale in scl_slope/scl_inter;
    radflow's route stores rescaled values (int16/int32 when integral, else float32) with
    scaling 1, 0."""
    axial = nii(units, "ct_axial")
    assert axial.get_data_dtype() == np.int16 and axial.get_fdata().min() < 0  # HU
    assert (axial.dataobj.slope, axial.dataobj.inter) == (1.0, -1024.0)
    oblique = nii(units, "ct_oblique")
    assert oblique.get_data_dtype() == np.int16
    assert (oblique.dataobj.slope, oblique.dataobj.inter) == (0.5, -1024.5)
    values = np.sort(np.unique(oblique.get_fdata()))
    assert values[0] == 1001 * 0.5 - 1024.5  # the marked corner of slice 0
    assert 1003 * 0.5 - 1024.5 in values  # a half-integer survives the scaling
    lut = nii(units, "ct_lut")
    assert (lut.dataobj.slope, lut.dataobj.inter) == (1.0, 0.0)
    wide = nii(units, "dx_iop")
    assert wide.get_data_dtype() == np.int32 and wide.get_fdata().max() == 60000
    assert (wide.dataobj.slope, wide.dataobj.inter) == (1.0, 0.0)
    assert sidecar(units, "cr_m1")["rescale_applied"] is True
    assert sidecar(units, "dx_m2")["rescale_applied"] is False
    assert "rescale_applied" not in sidecar(units, "ct_oblique")  # dcm2niix: scl_slope/inter


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


_PHI_KEYS = ("PatientName", "PatientID", "StudyInstanceUID", "InstitutionName", "StudyDate",
             "ImagePositionPatient", "SeriesDescription", "ProtocolName", "StationName",
             "DeviceSerialNumber", "AcquisitionTime", "SeriesInstanceUID")  # fmt: skip


def test_sidecar_content(units):
    meta = sidecar(units, "ct_axial")
    assert meta["series_pid"] == "ser-ct_axial" and meta["n_files"] == 6
    assert meta["Modality"] == "CT" and meta["ConvolutionKernel"] == "B30f"
    assert meta["radflow_version"] == radflow_version()
    assert meta["spacing_mm"] == [0.6, 0.8, 2.5] and meta["shape"] == [10, 12, 6]
    assert (meta["ndim"], meta["dtype"]) == (3, "int16")
    assert meta["route"] == "dcm2niix"
    assert meta["route_reason"] == "cross-sectional series: dcm2niix is the conversion engine"
    assert meta["dcm2niix_version"].startswith("v1.0.")
    assert meta["dcm2niix_suffix"] == ""
    engine = meta["dcm2niix"]
    assert set(engine) <= set(ENGINE_SIDECAR_FIELDS)
    assert engine["ConversionSoftwareVersion"] == meta["dcm2niix_version"]
    assert engine["SliceThickness"] == 2.5
    for key in _PHI_KEYS:
        assert key not in meta and key not in engine


def test_sidecar_content_mr_and_radflow_route(units):
    """dcm2niix's acquisition fields, in its units (seconds), come through its whitelist;
    its identifying fields (institution, station, serial number, series description and
    protocol name, which it writes into its own sidecar) do not. A radflow-route sidecar
    has the reader's notes and no dcm2niix fields."""
    meta = sidecar(units, "mr_sagittal")
    engine = meta["dcm2niix"]
    assert set(engine) <= set(ENGINE_SIDECAR_FIELDS)
    assert (engine["EchoTime"], engine["RepetitionTime"]) == (0.012, 0.5)
    assert (engine["FlipAngle"], engine["MagneticFieldStrength"]) == (90, 3)
    assert engine["ImageOrientationPatientDICOM"] == [0, 1, 0, 0, 0, -1]
    assert (meta["EchoTime"], meta["RepetitionTime"]) == (12.0, 500.0)  # radflow's: DICOM ms
    for key in _PHI_KEYS:
        assert key not in meta and key not in engine
    meta = sidecar(units, "dx_m2")
    assert meta["route"] == "radflow" and meta["route_reason"].startswith("projection radiograph")
    assert not {"dcm2niix", "dcm2niix_suffix"} & set(meta) and "dcm2niix_version" in meta
    assert meta["inverted_monochrome1"] is False


@pytest.mark.parametrize("name", ["ct_tilt", "ct_uneven"])
def test_sidecar_of_corrected_units_keeps_dcm2niix_fields(units, name):
    """dcm2niix writes one sidecar, named after the uncorrected image, for it and its
    "_Tilt_1"/"_Eq_1" version: the corrected unit's acquisition fields come from it."""
    meta = sidecar(units, name)
    engine = meta["dcm2niix"]
    assert set(engine) <= set(ENGINE_SIDECAR_FIELDS)
    assert engine.get("ConversionSoftwareVersion") == meta["dcm2niix_version"]
    assert engine.get("SliceThickness") == 2.5


# ------------------------------------------------------------ determinism, PHI
def test_deterministic(units, tmp_path):
    again = tmp_path / "again"
    convert_shard(units["shard_tsv"], units["root"], again, threads=1, progress=False)
    first = {p.name: p.read_bytes() for p in units["out"].iterdir()}
    second = {p.name: p.read_bytes() for p in again.iterdir()}
    assert first == second


def test_outputs_hold_no_phi(units):
    assert_phi_free(units["out"], list_files(units["root"]))
    for path in units["out"].iterdir():  # the acquisition time dcm2niix put in descrip
        data = path.read_bytes()
        data = gzip.decompress(data) if path.name.endswith(".gz") else data
        assert ACQUISITION_TIME[:6].encode() not in data, path.name


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
