"""Multi-series DICOM cases (radflow.dicom.cases, case_convert, seg): two MR series of a
study become one two-channel case; ground-truth masks, as label images in world space or
as DICOM SEG objects written here with highdicom, land on the voxels painted; nothing
identifying reaches results/.

The cohort (one index, one conversion for the module):
  good      FLAIR axial + T1 post-gad on another grid + an unmatched localizer; a NIfTI
            mask written in world space on a third grid (RAS, axes permuted)
  seg_ax    axial FLAIR + T1c, a SEG painted on the FLAIR
  seg_ob    oblique (rotated 25 deg about x, then 10 about z) FLAIR + T1c, SEG on FLAIR
  seg_sag   sagittal FLAIR + T1c, SEG on FLAIR
  seg_t1    axial FLAIR + T1c on a half-spacing grid aligned to it, SEG on the T1c
  outside   a NIfTI mask whose foreground lies beyond the image  -> fails at convert
  no_mask   FLAIR + T1c, no row in the masks table               -> "no mask"
  no_t1c    FLAIR only                                           -> missing channel t1c
  two_flair two FLAIRs + T1c                                     -> flair matched twice
  both      "FLAIR post gad" + T1 post                           -> matches both patterns
  mixed     FLAIR and T1c of two patients, one study uid        -> patient differs
  seg_other a SEG of this patient that references another study's series -> quarantined
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from radflow import conventions as C
from radflow.dicom.convert import convert_shard, convert_unit
from radflow.dicom.index import build_index
from radflow.files import list_files

from dicom_factory import (
    assert_phi_free,
    new_uid,
    rotation_cosines,
    write_labels,
    write_volume,
)

KEY = b"radflow-test-key-0123456789abcdef"
CHANNELS = {"flair": "(?i)flair", "t1c": r"(?i)(post|\+c|gad|t1.*ce)"}
FLAIR = dict(n_slices=6, rows=12, cols=10, pixel_spacing=(0.8, 0.6), slice_gap=2.5,
             origin=(-30.0, -40.0, 15.0), intercept=0)  # fmt: skip
#: T1c on its own grid: other spacing, size and origin (an ordinary multi-series study)
T1C = dict(n_slices=9, rows=14, cols=13, pixel_spacing=(0.7, 0.5), slice_gap=1.7,
           origin=(-30.3, -40.4, 14.2), intercept=0, value_offset=500)  # fmt: skip
AXIAL = dict(row_cosines=(1, 0, 0), col_cosines=(0, 1, 0))
SAGITTAL = dict(row_cosines=(0, 1, 0), col_cosines=(0, 0, -1))
_ob_r, _ob_c = rotation_cosines(25, "x")
_rz = np.array([[np.cos(0.17), -np.sin(0.17), 0], [np.sin(0.17), np.cos(0.17), 0], [0, 0, 1]])
OBLIQUE = dict(row_cosines=tuple(_rz @ _ob_r), col_cosines=tuple(_rz @ _ob_c))


def _series(root: Path, name: str, patient: str, study: str, description: str, **kwargs):
    paths = write_volume(root / patient / f"ser_{name}", patient_id=patient, accession=f"ACC{patient}",
                         study_uid=study, modality="MR",
                         extra={"SeriesDescription": f"{description} ZQX"}, **kwargs)  # fmt: skip
    return sorted(paths)


def _sorted_sources(paths):
    """Source datasets sorted along the slice normal (the SEG's frame order here)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))


def _paint(shape) -> np.ndarray:
    """Two segments that tell every flip and transpose apart: a box (1) and an L (2)."""
    label = np.zeros(shape, np.uint8)
    n, rows, cols = shape
    label[1 : n - 2, 2:6, 1:4] = 1
    label[n - 1, rows - 4 : rows - 1, cols - 3] = 2
    label[n - 1, rows - 2, cols - 3 : cols - 1] = 2
    return label


def _segmentation(sources, pixels: np.ndarray, names) -> hd.seg.Segmentation:
    """A BINARY SEG of `sources` (frames in their order), one segment per name, from
    `pixels` (frames, rows, columns, segments)."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, name in enumerate(names)
    ]  # fmt: skip
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels.astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=new_uid(), series_number=900,
        sop_instance_uid=new_uid(), instance_number=1, manufacturer="ZQX lab",
        manufacturer_model_name="seg tool", software_versions="1",
        device_serial_number="ZQX-SN-7",
    )  # fmt: skip


def _write_seg(path: Path, sources, label: np.ndarray, names=("lesion", "edema"), **overrides):
    """A SEG of the label map `label` (frames, rows, columns): label i is segment i."""
    if overrides:  # highdicom shares the sources' elements with the SEG: copy them first
        sources = [copy.deepcopy(ds) for ds in sources]
    seg = _segmentation(sources, np.stack([label == i + 1 for i in range(len(names))], -1), names)
    for keyword, value in overrides.items():
        setattr(seg, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _world_box_mask(path: Path, lo_lps, hi_lps, affine_ras: np.ndarray, shape) -> None:
    """A NIfTI label map (nibabel, RAS affine) painted 3 where the voxel centre lies in the
    LPS box [lo, hi]."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    ras = ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    lps = ras * np.array([-1, -1, 1])
    inside = np.all((lps >= lo_lps) & (lps <= hi_lps), axis=-1)
    nib.save(nib.Nifti1Image(inside.astype(np.uint8) * 3, affine_ras), path)


def _voxel_lps(image: nib.Nifti1Image) -> np.ndarray:
    """LPS world coordinates (x, y, z, 3) of every voxel centre of a NIfTI image."""
    shape = image.shape[:3]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    ras = ijk @ image.affine[:3, :3].T + image.affine[:3, 3]
    return ras * np.array([-1, -1, 1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cases")
    root, masks_dir = tmp / "dicom", tmp / "masks"
    masks_dir.mkdir()
    info: dict = {"root": root, "tmp": tmp, "series": {}, "studies": {}}
    rows = []

    def study(name, patient=None):
        uid = new_uid()
        info["studies"][name] = uid
        return patient or f"ZQX{name.upper()}", uid

    patient, uid = study("good")
    info["series"]["good"] = {
        "flair": _series(root, "flair", patient, uid, "AX FLAIR", **FLAIR),
        "t1c": _series(root, "t1c", patient, uid, "AX T1 post gad", **T1C),
    }
    _series(root, "loc", patient, uid, "3-plane localizer", n_slices=2)
    # the mask: a world box on a 0.5 mm grid whose axes are permuted against the FLAIR's
    mask_affine = np.array([[0, 0, -0.5, 36.0], [0, -0.5, 0, 45.0], [0.5, 0, 0, 12.0],
                            [0, 0, 0, 1.0]])  # fmt: skip
    # box faces lie >= 0.3 mm from every FLAIR voxel centre (the mask's voxels are 0.5 mm)
    info["box"] = (np.array([-26.7, -36.4, 18.75]), np.array([-24.9, -34.0, 23.75]))
    _world_box_mask(masks_dir / "good_mask.nii.gz", *info["box"], mask_affine, (40, 30, 30))
    rows.append((uid, "masks/good_mask.nii.gz"))

    for name, orientation in (("seg_ax", AXIAL), ("seg_ob", OBLIQUE), ("seg_sag", SAGITTAL)):
        patient, uid = study(name)
        flair = _series(root, "flair", patient, uid, "FLAIR", **{**FLAIR, **orientation})
        _series(root, "t1c", patient, uid, "T1+C", **{**T1C, **orientation})
        sources = _sorted_sources(flair)
        label = _paint((len(sources), sources[0].Rows, sources[0].Columns))
        info[name] = (sources, label)
        _write_seg(masks_dir / f"{name}.dcm", sources, label)
        rows.append((uid, f"masks/{name}.dcm"))

    patient, uid = study("seg_t1")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    half = dict(FLAIR, n_slices=11, rows=23, cols=19, pixel_spacing=(0.4, 0.3), slice_gap=1.25)
    t1c = _series(root, "t1c", patient, uid, "T1 CE", **half)
    sources = _sorted_sources(t1c)
    label = np.zeros((11, 23, 19), np.uint8)
    label[2:7:2, 4:13:2, 2:9:2] = 1  # on T1c voxels that are FLAIR voxel centres
    info["seg_t1"] = label
    _write_seg(masks_dir / "seg_t1.dcm", sources, label, names=("lesion",))
    rows.append((uid, "masks/seg_t1.dcm"))

    patient, uid = study("outside")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    _series(root, "t1c", patient, uid, "T1 post", **T1C)
    _world_box_mask(masks_dir / "outside.nii", np.array([-100.0, -100, -100]),
                    np.array([100.0, 100, 100]), np.diag([2.0, 2, 2, 1]), (10, 10, 10))  # fmt: skip
    rows.append((uid, "masks/outside.nii"))

    patient, uid = study("no_mask")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    _series(root, "t1c", patient, uid, "T1 post", **T1C)

    patient, uid = study("no_t1c")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    rows.append((uid, "masks/good_mask.nii.gz"))

    patient, uid = study("two_flair")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    _series(root, "flair2", patient, uid, "FLAIR repeat", **FLAIR)
    _series(root, "t1c", patient, uid, "T1 post", **T1C)

    patient, uid = study("both")
    _series(root, "flair", patient, uid, "FLAIR post gad", **FLAIR)
    _series(root, "t1c", patient, uid, "T1 post", **T1C)

    patient, uid = study("mixed")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    _series(root, "t1c", "ZQXMIXEDOTHER", uid, "T1 post", **T1C)

    patient, uid = study("seg_other")
    _series(root, "flair", patient, uid, "FLAIR", **FLAIR)
    _series(root, "t1c", patient, uid, "T1 post", **T1C)
    sources, label = info["seg_ax"]
    _write_seg(masks_dir / "seg_other.dcm", sources, label, PatientID=patient)
    rows.append((uid, "masks/seg_other.dcm"))

    rows.append(("1.2.3.4.5.999", "masks/nowhere.nii.gz"))  # matches no study
    masks_table = write_labels(tmp / "masks.csv", rows, ["StudyInstanceUID", "mask"])
    labels = write_labels(
        tmp / "labels.csv",
        [(f"ACCZQX{name.upper()}", str(i % 2)) for i, name in enumerate(info["studies"])]
        + [("ACCZQXMIXEDOTHER", "1")],
        ["AccessionNumber", "label"],
    )
    index = build_index(root, labels, key=KEY, n_shards=3, progress=False,
                        case_key="StudyInstanceUID", channels=CHANNELS,
                        masks_table=masks_table)  # fmt: skip
    results, private = tmp / "results", tmp / "private"
    index.write(results / "index", private)
    manifests = []
    for k in range(3):
        shard = private / C.SHARD_INDEX_DIR / f"{C.shard_name(k)}.tsv"
        manifests.append(convert_shard(shard, root, results / "nifti", progress=False))
    info.update(index=index, manifest=pd.concat(manifests, ignore_index=True),
                results=results, private=private, masks_table=masks_table)  # fmt: skip
    return info


def case_pid(name: str, cohort) -> str:
    return C.pseudonym(KEY, "ser", f"case/StudyInstanceUID={cohort['studies'][name]}")


def _quarantine_reason(cohort, name: str) -> str:
    q = cohort["index"].quarantine
    reasons = q.loc[q[C.SERIES_PID] == case_pid(name, cohort), C.REASON].tolist()
    assert len(reasons) == 1, (name, reasons)
    return reasons[0]


def test_index_groups_the_series_of_a_study_into_one_case(cohort):
    index = cohort["index"]
    kept = set(index.series[C.SERIES_PID])
    expected = {"good", "seg_ax", "seg_ob", "seg_sag", "seg_t1", "outside"}
    assert kept == {case_pid(name, cohort) for name in expected}
    good = index.series.set_index(C.SERIES_PID).loc[case_pid("good", cohort)]
    assert good["channels"] == "flair t1c" and good["n_files"] == 6 + 9
    assert good[C.LABEL] == 0  # the labels table's value for the case's accession
    assert index.summary["channels"] == ["flair", "t1c"]
    # every file of a case is in the one shard its pseudonym hashes to, channels in order
    for k, table in index.shard_files.items():
        for pid, rows in table.groupby(C.SERIES_PID, sort=False):
            assert C.shard_of(pid, 3) == k
            images = rows[rows[C.ROLE] == C.ROLE_IMAGE]
            assert list(dict.fromkeys(images[C.CHANNEL])) == ["flair", "t1c"]
            assert (rows[C.ROLE] == C.ROLE_MASK).sum() == 1
    flair_files = {
        str(Path(p).relative_to(cohort["root"])) for p in cohort["series"]["good"]["flair"]
    }
    table = pd.concat(index.shard_files.values())
    case_rows = table[table[C.SERIES_PID] == case_pid("good", cohort)]
    assert set(case_rows.loc[case_rows[C.CHANNEL] == "flair", C.PATH]) == flair_files


def test_index_quarantines_incomplete_and_ambiguous_cases(cohort):
    assert _quarantine_reason(cohort, "no_t1c") == (
        r"missing channel: no image unit of the case matches t1c ('(?i)(post|\\+c|gad|t1.*ce)' "
        "in SeriesDescription)"
    )
    assert _quarantine_reason(cohort, "two_flair").startswith(
        "channel matches several image units: 2 match flair ('(?i)flair' in SeriesDescription)"
    )
    assert _quarantine_reason(cohort, "both").startswith(
        "image unit matches several channel patterns: flair, t1c"
    )
    assert _quarantine_reason(cohort, "mixed") == (
        "patient differs between the series of the case (PatientID)"
    )
    assert _quarantine_reason(cohort, "no_mask") == "no mask in masks table"
    assert _quarantine_reason(cohort, "seg_other") == (
        "mask: the DICOM SEG references none of the case's series"
    )
    summary = cohort["index"].summary
    assert summary["cases"]["masks"] == {"n_rows": 9, "unmatched": 1, "kept_cases_with_mask": 6,
                                         "masks_key": "StudyInstanceUID"}  # fmt: skip
    assert summary["units_excluded"]["missing channel"] == 1


def test_unmatched_localizer_is_left_out_not_an_error(cohort):
    q = cohort["index"].quarantine
    left_out = q[q[C.REASON] == "matches no channel pattern (left out)"]
    assert len(left_out) == 1  # the good study's localizer, under its own unit pseudonym
    assert left_out[C.SERIES_PID].iloc[0] not in set(cohort["index"].series[C.SERIES_PID])
    assert cohort["index"].summary["cases"]["n_units_not_a_channel"] == 1
    assert "1 image units match no channel" in cohort["index"].summary_text()


def test_reference_channel_is_the_lone_conversion_and_t1c_is_resampled(cohort, tmp_path):
    pid = case_pid("good", cohort)
    row = cohort["manifest"].set_index(C.SERIES_PID).loc[pid]
    assert row[C.STATUS] == C.STATUS_OK and row["route"] == "dcm2niix", row[C.REASON]
    case = nib.load(cohort["results"] / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
    root = cohort["root"]
    flair = [str(Path(p).relative_to(root)) for p in cohort["series"]["good"]["flair"]]
    assert convert_unit("alone", "MR", flair, root, tmp_path)[C.STATUS] == C.STATUS_OK
    alone = nib.load(tmp_path / f"alone{C.NIFTI_SUFFIX}")
    assert case.shape == (*alone.shape, 2)
    assert np.array_equal(case.affine, alone.affine)
    np.testing.assert_array_equal(case.get_fdata()[..., 0], alone.get_fdata())

    # the T1c's stored values are linear in its (slice, row, column) indices
    # (1000 + 100 k + 7 r + c + 500), so a linear resampling is exact wherever all eight
    # neighbours exist and none is the top-left marker pixel: check every such voxel
    lps = _voxel_lps(case)
    normal = np.cross(AXIAL["row_cosines"], AXIAL["col_cosines"])
    offset = lps - np.array(T1C["origin"])
    col = offset @ np.array(AXIAL["row_cosines"]) / T1C["pixel_spacing"][1]
    row_ = offset @ np.array(AXIAL["col_cosines"]) / T1C["pixel_spacing"][0]
    k = offset @ normal / T1C["slice_gap"]
    inside = ((k >= 0) & (k <= T1C["n_slices"] - 1) & (row_ >= 0) & (row_ <= T1C["rows"] - 1)
              & (col >= 0) & (col <= T1C["cols"] - 1)
              & ~((np.floor(row_) <= 1) & (np.floor(col) <= 2)))  # fmt: skip
    assert inside.sum() > 50
    expected = 1000 + 100 * k + 7 * row_ + col + 500
    np.testing.assert_allclose(case.get_fdata()[..., 1][inside], expected[inside], atol=2e-3)

    sidecar = json.loads((cohort["results"] / "nifti" / f"{pid}.json").read_text())
    assert sidecar["channels"] == ["flair", "t1c"] and sidecar["n_channels"] == 2
    assert sidecar["channels_resampled"] == ["t1c"] and sidecar["Modality"] == "MR"
    assert sidecar["channel_sidecars"]["flair"]["route"] == "dcm2niix"
    assert sidecar["has_mask"] and sidecar["mask_source"] == "label image"


def test_world_space_nifti_mask_on_another_grid_lands_on_the_right_voxels(cohort):
    pid = case_pid("good", cohort)
    mask = nib.load(cohort["results"] / "nifti" / f"{pid}{C.MASK_SUFFIX}")
    image = nib.load(cohort["results"] / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
    assert mask.get_data_dtype() == np.uint8 and mask.shape == image.shape[:3]
    assert np.array_equal(mask.affine, image.affine)
    lo, hi = cohort["box"]
    lps = _voxel_lps(image)
    expected = np.all((lps >= lo) & (lps <= hi), axis=-1).astype(np.uint8) * 3
    assert expected.sum() == 3 * (3 * 3 * 2)  # 3 x 3 x 2 voxel centres in the box
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)


def _expected_from_source(sources, label: np.ndarray, image: nib.Nifti1Image) -> np.ndarray:
    """The painted label moved pixel by pixel from its source instances onto `image`'s
    voxels through world coordinates (each pixel must hit a voxel centre exactly)."""
    expected = np.zeros(image.shape[:3], np.uint8)
    inverse = np.linalg.inv(image.affine)
    for k, ds in enumerate(sources):
        if not label[k].any():
            continue
        r_cos, c_cos = np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3))
        spacing = [float(v) for v in ds.PixelSpacing]
        rr, cc = np.nonzero(label[k])
        lps = (np.asarray(ds.ImagePositionPatient, float) + np.outer(cc * spacing[1], r_cos)
               + np.outer(rr * spacing[0], c_cos))  # fmt: skip
        ras = lps * np.array([-1, -1, 1])
        ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
        assert np.abs(ijk - np.round(ijk)).max() < 1e-3
        i, j, kk = np.round(ijk).astype(int).T
        expected[i, j, kk] = label[k][rr, cc]
    return expected


@pytest.mark.parametrize("name", ["seg_ax", "seg_ob", "seg_sag"])
def test_dicom_seg_lands_on_exactly_the_painted_voxels(cohort, name):
    pid = case_pid(name, cohort)
    row = cohort["manifest"].set_index(C.SERIES_PID).loc[pid]
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    mask = nib.load(cohort["results"] / "nifti" / f"{pid}{C.MASK_SUFFIX}")
    sources, label = cohort[name]
    expected = _expected_from_source(sources, label, mask)
    assert [(expected == v).sum() for v in (1, 2)] == [(label == v).sum() for v in (1, 2)]
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    sidecar = json.loads((cohort["results"] / "nifti" / f"{pid}.json").read_text())
    assert sidecar["mask_source"] == "DICOM SEG" and sidecar["mask_labels"] == [1, 2]


def test_dicom_seg_on_the_second_channel_is_carried_onto_the_reference_grid(cohort):
    pid = case_pid("seg_t1", cohort)
    mask = nib.load(cohort["results"] / "nifti" / f"{pid}{C.MASK_SUFFIX}")
    assert mask.shape == (10, 12, 6)  # the FLAIR's grid, not the T1c's
    # FLAIR voxel (slice k, row r, column c) is T1c voxel (2k, 2r, 2c); dcm2niix stores
    # rows bottom-up, so compare through world coordinates
    lps = _voxel_lps(mask)
    offset = lps - np.array(FLAIR["origin"])
    col = np.round(offset[..., 0] / 0.3).astype(int)
    row_ = np.round(offset[..., 1] / 0.4).astype(int)
    k = np.round(offset[..., 2] / 1.25).astype(int)
    expected = cohort["seg_t1"][k, row_, col]
    assert expected.sum() == 3 * 5 * 4
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)


def test_mask_outside_the_image_fails_its_case_with_the_reason(cohort):
    pid = case_pid("outside", cohort)
    row = cohort["manifest"].set_index(C.SERIES_PID).loc[pid]
    assert row[C.STATUS] == C.STATUS_FAILED
    assert row[C.REASON].startswith("mask outside the image: ")
    assert not list((cohort["results"] / "nifti").glob(f"{pid}*"))


def test_no_identifier_description_or_path_reaches_results(cohort):
    rels = list_files(cohort["root"]) + ["good_mask.nii.gz", "seg_other.dcm", "outside.nii"]
    assert_phi_free(cohort["results"], rels)
    text = "".join(p.read_text() for p in (cohort["results"] / "index").glob("*.tsv"))
    assert "FLAIR" not in text and "post gad" not in text  # descriptions stay in memory
    private = "".join(p.read_text() for p in (cohort["private"] / C.SHARD_INDEX_DIR).iterdir())
    assert "good_mask.nii.gz" in private  # the user can find the mask files there


def test_mask_labels_map_segment_labels_and_unknown_labels_fail(cohort, tmp_path):
    sources, label = cohort["seg_ax"]
    uid = cohort["studies"]["seg_ax"]
    masks = write_labels(tmp_path / "masks.csv", [(uid, str(cohort["tmp"] / "masks/seg_ax.dcm"))],
                         ["StudyInstanceUID", "mask"])  # fmt: skip
    out = {}
    for run, mapping in (("mapped", {"lesion": 7, "edema": 0}), ("unknown", {"lesion": 7})):
        index = build_index(cohort["root"], None, key=KEY, n_shards=1, progress=False,
                            case_key="StudyInstanceUID", channels=CHANNELS, masks_table=masks,
                            mask_labels=mapping)  # fmt: skip
        assert len(index.series) == 1 and (index.series[C.LABEL] == -1).all()
        index.write(tmp_path / run / "index", tmp_path / run / "private")
        shard = tmp_path / run / "private" / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
        out[run] = convert_shard(shard, cohort["root"], tmp_path / run / "nifti", progress=False)
    assert out["mapped"][C.STATUS].tolist() == [C.STATUS_OK]
    pid = case_pid("seg_ax", cohort)
    mask = np.asarray(nib.load(tmp_path / "mapped" / "nifti" / f"{pid}{C.MASK_SUFFIX}").dataobj)
    assert set(np.unique(mask)) == {0, 7} and (mask == 7).sum() == (label == 1).sum()
    assert out["unknown"][C.REASON].tolist() == [
        "segment 2's SegmentLabel is not a key of data.mask_labels; add it (0 drops the segment)"
    ]


def test_overlapping_segments_fail_the_case(cohort, tmp_path):
    sources, label = cohort["seg_ax"]
    pixels = np.stack([label == 1, label == 2, np.zeros_like(label, bool)], -1)
    pixels[1, 2, 1, 2] = True  # segment 3 on one pixel of segment 1
    seg = tmp_path / "overlap.dcm"
    _segmentation(sources, pixels, ("a", "b", "c")).save_as(seg)
    uid = cohort["studies"]["seg_ax"]
    masks = write_labels(tmp_path / "masks.csv", [(uid, str(seg))], ["StudyInstanceUID", "mask"])
    index = build_index(cohort["root"], None, key=KEY, n_shards=1, progress=False,
                        case_key="StudyInstanceUID", channels=CHANNELS, masks_table=masks)  # fmt: skip
    assert len(index.series) == 1, index.quarantine[C.REASON].tolist()
    index.write(tmp_path / "index", tmp_path / "private")
    shard = tmp_path / "private" / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
    manifest = convert_shard(shard, cohort["root"], tmp_path / "nifti", progress=False)
    assert manifest[C.REASON].tolist() == [
        "the DICOM SEG's segments overlap in 1 pixels: one label map needs non-overlapping segments"
    ]


def test_case_settings_are_checked_by_schema_and_config(tmp_path):
    import yaml
    from snakemake.utils import validate

    from radflow.config import ConfigError, check_config

    root = Path(__file__).parents[1]
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    validate(config, str(root / "config" / "schema.yaml"), set_default=True)
    data = config["data"]
    assert (data["case_key"], data["channels"], data["masks_table"]) == (None, None, None)
    assert (data["channel_keyword"], data["masks_column"]) == ("SeriesDescription", "mask")
    data.update(case_key="StudyInstanceUID", channels={"flair": "(?i)flair", "t1c": "(post"},
                reference_channel="pd", mask_labels={"lesion": 1})  # fmt: skip
    with pytest.raises(ConfigError) as error:
        check_config(config)
    message = str(error.value)
    assert "data.channels.t1c: '(post' is not a regular expression" in message
    assert "data.reference_channel 'pd' is not one of data.channels (flair, t1c)" in message
    assert "data.mask_labels: set only with data.masks_table" in message
    data.update(channels=None, reference_channel=None, mask_labels=None)
    with pytest.raises(ConfigError, match="data.case_key and data.channels go together"):
        check_config(config)
    bad = dict(config, data={**data, "channels": {"flair": "x"}, "mask_labels": {"a": -1}})
    with pytest.raises(Exception, match="-1"):
        validate(bad, str(root / "config" / "schema.yaml"))
    # a masks table makes the labels table optional; an images table takes neither key
    masks = write_labels(tmp_path / "masks.csv", [], ["StudyInstanceUID", "mask"])
    data.update(channels={"flair": "x"}, masks_table=str(masks), labels_table=None,
                annotations_table=None)  # fmt: skip
    config["synthesize"]["enabled"] = False
    data["dicom_root"] = str(tmp_path)
    check_config(config)
    data.update(dicom_root=None, images_table=str(masks))
    with pytest.raises(ConfigError, match="data.case_key: DICOM input only"):
        check_config(config)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "lidc").is_dir(), reason=f"LIDC slabs not found at {SHARED}")
def test_dicom_seg_on_real_ct_series_without_case_key(tmp_path):
    """Masks without data.case_key: every series is its own one-channel case. On the three
    real LIDC-IDRI CT slabs (a vendor export nobody here wrote), a SEG painted on each
    series' own instances lands on exactly those voxels, and the image is the lone
    conversion of the series, byte for byte."""
    root = SHARED / "lidc"
    rows, painted = [], {}
    for i, folder in enumerate(sorted({p.parent for p in root.rglob("*.dcm")})):
        sources = _sorted_sources(sorted(folder.glob("*.dcm")))
        label = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), np.uint8)
        label[2 : len(sources) - 3, 200 + 9 * i : 260, 150:230] = 1
        label[len(sources) - 1, 300:302, 310:340] = 2
        uid = str(sources[0].SeriesInstanceUID)
        painted[uid] = (sources, label, folder)
        rows.append((uid, str(_write_seg(tmp_path / f"seg{i}.dcm", sources, label))))
    masks = write_labels(tmp_path / "masks.csv", rows, ["SeriesInstanceUID", "mask"])
    index = build_index(root, None, key=KEY, n_shards=1, progress=False, masks_table=masks,
                        masks_key="SeriesInstanceUID")  # fmt: skip
    assert len(index.series) == 3 and "channels" in index.series.columns
    index.write(tmp_path / "index", tmp_path / "private")
    shard = tmp_path / "private" / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
    manifest = convert_shard(shard, root, tmp_path / "nifti", progress=False)
    assert manifest[C.STATUS].tolist() == [C.STATUS_OK] * 3, manifest[C.REASON].tolist()
    for uid, (sources, label, folder) in painted.items():
        pid = C.pseudonym(KEY, "ser", uid)
        mask = nib.load(tmp_path / "nifti" / f"{pid}{C.MASK_SUFFIX}")
        np.testing.assert_array_equal(
            np.asarray(mask.dataobj), _expected_from_source(sources, label, mask)
        )
        files = [str(p.relative_to(root)) for p in sorted(folder.glob("*.dcm"))]
        assert convert_unit("alone", "CT", files, root, tmp_path / "alone")[C.STATUS] == "ok"
        ours = (tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}").read_bytes()
        assert ours == (tmp_path / "alone" / f"alone{C.NIFTI_SUFFIX}").read_bytes()
        sidecar = json.loads((tmp_path / "nifti" / f"{pid}.json").read_text())
        assert sidecar["n_channels"] == 1 and sidecar["channels"] == [] and sidecar["has_mask"]


def test_mask_onto_copies_a_matching_grid_and_refuses_to_lose_a_label():
    import SimpleITK as sitk

    from radflow.cases import mask_onto

    reference = sitk.Image(6, 5, 4, sitk.sitkInt16)
    reference.SetSpacing((2.0, 2.0, 3.0))
    reference.SetOrigin((-5.0, 7.0, 1.0))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3], labels[3, 4, 5] = 4, 9
    same = sitk.GetImageFromArray(labels)
    same.CopyInformation(reference)
    array, notes = mask_onto(same, reference)
    assert np.array_equal(array, labels)
    assert notes == {"mask_resampled": False, "mask_labels": [4, 9]}
    # a 4x finer grid aligned to the reference: reference voxel i is fine voxel 4i, so a
    # one-voxel structure at fine voxel 2 (between two reference centres) cannot survive
    fine = np.zeros((16, 20, 24), np.uint8)
    fine[4:9, 4:9, 4:9] = 1
    fine[6, 6, 2] = 2

    def on_fine_grid(array):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.5, 0.5, 0.75))
        image.SetOrigin((-5.0, 7.0, 1.0))
        return image

    with pytest.raises(ValueError, match="mask label lost on the image's grid: 2 "):
        mask_onto(on_fine_grid(fine), reference)
    array, notes = mask_onto(on_fine_grid(np.where(fine == 2, 0, fine)), reference)
    assert notes == {"mask_resampled": True, "mask_labels": [1]}
    assert np.array_equal(np.argwhere(array == 1), [[k, j, i] for k in (1, 2) for j in (1, 2)
                                                     for i in (1, 2)])  # fmt: skip


def test_unusable_mask_files_quarantine_their_case_at_index(cohort, tmp_path):
    import shutil

    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b broken")
    shutil.copy(cohort["series"]["good"]["flair"][0], tmp_path / "slice.dcm")
    files = {"seg_ax": "nowhere.nii.gz", "seg_ob": "notes.txt", "seg_sag": "broken.nii.gz",
             "seg_t1": "slice.dcm"}  # fmt: skip
    masks = write_labels(tmp_path / "masks.csv",
                         [(cohort["studies"][name], f) for name, f in files.items()],
                         ["StudyInstanceUID", "mask"])  # fmt: skip
    index = build_index(cohort["root"], None, key=KEY, n_shards=1, progress=False,
                        case_key="StudyInstanceUID", channels=CHANNELS, masks_table=masks)  # fmt: skip
    reasons = {name: _quarantine_reason({**cohort, "index": index}, name) for name in files}
    assert reasons["seg_ax"] == "mask: file not found"
    assert reasons["seg_ob"].startswith("mask: unsupported format")
    assert reasons["seg_sag"].startswith("mask: unreadable label image (")
    assert "broken" not in reasons["seg_sag"]
    assert reasons["seg_t1"] == "mask: a DICOM file that is not a SEG (MR Image Storage)"
    assert index.summary["units_excluded"]["mask: unreadable label image"] == 1
