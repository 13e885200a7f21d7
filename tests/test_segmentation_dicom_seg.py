"""A prediction on the converted NIfTI grid written as a DICOM SEG of its source series
(radflow.tasks.segmentation.dicom_seg): axial, sagittal and oblique MR series written
here, converted by radflow's converter (dcm2niix route), labelled on the converted grid,
written as a SEG, read back with highdicom and checked frame by frame against the source.

The label map is a function of the converted image's intensities (each stored value
1000 + 100 k + 7 r + c names its source slice k, row r and column c), so the expected SEG
frame of a source instance follows from that instance's own pixels: no geometry of the
test's own decides what is right."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations as ornt_lib

from radflow import conventions as C
from radflow.dicom.convert import convert_unit
from radflow.geometry import canonical_spacing_mm, restore_native, write_label_nifti
from radflow.tasks.segmentation.dicom_seg import labels_on_source_frames, write_prediction_seg
from radflow.volumes import VolumeSettings, preprocess_volume

from dicom_factory import (
    BIRTH_DATE,
    INSTITUTION,
    PATIENT_NAME,
    PHI_MARKER,
    REFERRING_PHYSICIAN,
    STUDY_DATE,
    rotation_cosines,
    write_volume,
)

SEGMENTS = {1: "necrosis", 2: "oedema", 4: "enhancing"}
PID = "pat-0123456789abcdef"
_rz = np.array([[np.cos(0.17), -np.sin(0.17), 0], [np.sin(0.17), np.cos(0.17), 0], [0, 0, 1]])
ORIENTATIONS = {
    "axial": dict(row_cosines=(1, 0, 0), col_cosines=(0, 1, 0)),
    "sagittal": dict(row_cosines=(0, 1, 0), col_cosines=(0, 0, -1)),
    "oblique": dict(
        row_cosines=tuple(_rz @ rotation_cosines(25, "x")[0]),
        col_cosines=tuple(_rz @ rotation_cosines(25, "x")[1]),
    ),  # fmt: skip
}


def _label_of_values(values: np.ndarray) -> np.ndarray:
    """The test's label map as a function of stored values: slice 0 empty (its frames are
    omitted), then labels 0, 1, 2, 4 cycling over 7 r + c (every flip changes it)."""
    values = np.rint(np.asarray(values, float)).astype(np.int64) - 1000
    labels = np.array([0, 1, 2, 4], np.uint8)[values % 4]
    labels[values // 100 == 0] = 0
    return labels


@pytest.fixture(scope="module", params=list(ORIENTATIONS))
def series(request, tmp_path_factory):
    """(source file paths in shuffled order, converted NIfTI image, patient id, accession)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    patient, accession = f"{PHI_MARKER}PID{name.upper()}77", f"{PHI_MARKER}ACC{name}91"
    paths = write_volume(tmp / "dicom", patient_id=patient, accession=accession, modality="MR",
                         n_slices=6, rows=14, cols=11, pixel_spacing=(0.9, 0.7), slice_gap=2.0,
                         intercept=0, origin=(-20.5, 31.0, 12.25), rng=random.Random(5),
                         extra={"InstitutionAddress": f"{PHI_MARKER} Lane 4",
                                "OtherPatientIDs": f"{PHI_MARKER}OTHER5"},
                         **ORIENTATIONS[name])  # fmt: skip
    files = [str(p.relative_to(tmp / "dicom")) for p in paths]
    row = convert_unit("ser-x", "MR", files, tmp / "dicom", tmp / "nifti")
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    image = nib.load(tmp / "nifti" / f"ser-x{C.NIFTI_SUFFIX}")
    return paths, image, patient, accession


def _write(series, tmp_path, labels=None, **kwargs) -> tuple[Path, np.ndarray]:
    paths, image, _, _ = series
    if labels is None:
        labels = _label_of_values(np.asarray(image.dataobj))
    out = tmp_path / "private" / "pred_seg.dcm"
    write_prediction_seg(out, labels, image.affine, paths, segments=SEGMENTS, patient_pid=PID,
                         algorithm_version="1.2.3", uid_seed="test", **kwargs)  # fmt: skip
    return out, labels


def _labels_read_back(seg: hd.seg.Segmentation, uids) -> np.ndarray:
    """The SEG's label maps (label values of SEGMENTS, by segment label) on the source
    instances `uids`, as highdicom matches frames to instances."""
    value_of = {name: value for value, name in SEGMENTS.items()}
    numbers = sorted(seg.SegmentSequence, key=lambda s: int(s.SegmentNumber))
    lookup = np.array([0, *[value_of[s.SegmentLabel] for s in numbers]])
    return lookup[seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)]


def test_frames_reference_their_source_instances_and_hold_its_labels(series, tmp_path):
    paths, _, _, _ = series
    out, _ = _write(series, tmp_path)
    seg = hd.seg.segread(out)
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}
    expected = {uid: _label_of_values(ds.pixel_array) for uid, ds in sources.items()}
    numbers = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    value_of = {n: next(v for v, name in SEGMENTS.items() if name == s.SegmentLabel)
                for n, s in numbers.items()}  # fmt: skip
    assert sorted(value_of.values()) == sorted(SEGMENTS)
    for s in numbers.values():
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("radflow", "1.2.3")
    frames = seg.pixel_array
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert uid in sources
        np.testing.assert_array_equal(frame, expected[uid] == value_of[number])
        seen.add((uid, number))
    # exactly the non-empty (instance, segment) pairs are stored
    assert seen == {(uid, n) for uid, lab in expected.items() for n in value_of
                    if (lab == value_of[n]).any()}  # fmt: skip
    assert not any(uid for uid, _ in seen if not expected[uid].any())
    # and highdicom, matching frames to instances itself, reads the same label maps back
    uids = list(sources)
    read_back = _labels_read_back(seg, uids)
    np.testing.assert_array_equal(read_back, np.stack([expected[uid] for uid in uids]))


def test_seg_geometry_is_the_source_geometry(series, tmp_path):
    paths, _, _, _ = series
    seg = hd.seg.segread(_write(series, tmp_path)[0])
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}
    first = next(iter(sources.values()))
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               first.ImageOrientationPatient, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, first.PixelSpacing)
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [
        str(first.SeriesInstanceUID)
    ]
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                                   sources[uid].ImagePositionPatient, atol=1e-4)  # fmt: skip


def test_seg_carries_no_identifier_of_the_source(series, tmp_path):
    _, _, patient, accession = series
    out, _ = _write(series, tmp_path)
    data = out.read_bytes()
    text = data.decode("latin-1")
    assert PHI_MARKER.lower() not in text.lower()  # description, station, study id, address...
    for planted in (PATIENT_NAME, patient, accession, BIRTH_DATE, INSTITUTION,
                    REFERRING_PHYSICIAN, STUDY_DATE):  # fmt: skip
        assert planted not in text, planted
    seg = pydicom.dcmread(out)
    assert seg.PatientID == PID and str(seg.PatientName) == PID
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate",
                    "ReferringPhysicianName"):  # fmt: skip
        assert not seg.get(keyword), keyword
    assert "InstitutionName" not in seg and "OtherPatientIDs" not in seg
    assert [str(e.Manufacturer) for e in seg.ContributingEquipmentSequence] == [
        "Highdicom open-source contributors"
    ]  # not the source's acquisition equipment (institution, station, serial number)


def test_same_inputs_give_the_same_bytes(series, tmp_path):
    when = dt.datetime(2024, 5, 6, 7, 8, 9)
    first = _write(series, tmp_path / "a", created=when)[0].read_bytes()
    assert _write(series, tmp_path / "b", created=when)[0].read_bytes() == first
    assert not list((tmp_path / "a" / "private").glob(".*tmp"))  # written atomically


def test_empty_prediction_writes_a_valid_seg_of_empty_frames(series, tmp_path):
    paths, image, _, _ = series
    out, _ = _write(series, tmp_path, labels=np.zeros(image.shape, np.uint8))
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == len(paths) * len(SEGMENTS)
    assert not seg.pixel_array.any()
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    assert not seg.get_pixels_by_source_instance(uids).any()


def test_a_label_without_a_segment_is_an_error_naming_it(series, tmp_path):
    _, image, _, _ = series
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 3, 1
    with pytest.raises(ValueError, match=r"label values \[3\] are not in segments"):
        _write(series, tmp_path, labels=labels)
    assert not (tmp_path / "private" / "pred_seg.dcm").exists()


def test_sampling_goes_through_world_coordinates_not_array_axes(series):
    """The same labels on a reoriented grid (axes permuted and flipped, affine to match)
    and on the source order reversed give the same frames; beyond the grid is 0."""
    paths, image, _, _ = series
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    labels = _label_of_values(np.asarray(image.dataobj))
    frames = labels_on_source_frames(labels, image.affine, datasets)
    ornt = ornt_lib.io_orientation(image.affine)
    reoriented = ornt_lib.apply_orientation(labels, ornt)
    affine = image.affine @ ornt_lib.inv_ornt_aff(ornt, labels.shape)
    np.testing.assert_array_equal(labels_on_source_frames(reoriented, affine, datasets), frames)
    backwards = labels_on_source_frames(labels, image.affine, datasets[::-1])
    np.testing.assert_array_equal(backwards, frames[::-1])
    shifted = image.affine.copy()
    shifted[:3, 3] += 1000.0
    assert not labels_on_source_frames(labels, shifted, datasets).any()


def test_prediction_restored_from_preprocessed_space_becomes_the_expected_seg(series, tmp_path):
    """The workflow's route: the label map preprocessed (reoriented, cropped, at native
    spacing) as a prediction would be, restored (restore_native), written as the prediction
    NIfTI (write_label_nifti: exactly the converted image's affine and shape), read back
    and written as a SEG whose frames are the labels of their source instances."""
    paths, image, _, _ = series
    labels = _label_of_values(np.asarray(image.dataobj))
    case = preprocess_volume(np.asarray(image.dataobj), image.affine, "MR",
                             canonical_spacing_mm(image.affine),
                             VolumeSettings(dtype="float32"), labels)  # fmt: skip
    restored = restore_native(case.mask, case.geometry)
    written = nib.load(write_label_nifti(tmp_path / "pred.nii.gz", restored, case.geometry))
    assert written.shape == image.shape
    np.testing.assert_array_equal(written.affine, image.affine)
    out, _ = _write(series, tmp_path, labels=np.asarray(written.dataobj))
    uids, expected = [], []
    for ds in map(pydicom.dcmread, paths):
        uids.append(str(ds.SOPInstanceUID))
        expected.append(_label_of_values(ds.pixel_array))
    np.testing.assert_array_equal(_labels_read_back(hd.seg.segread(out), uids), np.stack(expected))
