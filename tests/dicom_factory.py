"""Helpers that write small, valid DICOM files with pydicom for radflow's tests.

Every helper plants fake but *distinctive* PHI (names, ids, birth date, accession
number, institution, referring physician) so a test can grep outputs for leaks:
every planted free-text value contains the marker ``ZQX`` (see `PHI_MARKER`), and the
UIDs and other values that cannot carry it are recorded in `planted_values()`.

Geometry conventions (DICOM, LPS patient coordinates, millimetres):
``row_cosines`` is the direction of increasing column index, ``col_cosines`` the direction
of increasing row index, ``pixel_spacing = (between rows, between columns)``.
"""

from __future__ import annotations

import gzip
import itertools
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    MRImageStorage,
)

PHI_MARKER = "ZQX"
PATIENT_NAME = "Zqxbottom^Zqxhortensia"
REFERRING_PHYSICIAN = "Drzqx^Quillon"
INSTITUTION = "ZQX Memorial Hospital of Plimpton"
BIRTH_DATE = "19230817"
STUDY_DATE = "20190422"
STUDY_TIME = "134207"

_uid_counter = itertools.count(1)
_PLANTED: set[str] = {PATIENT_NAME, REFERRING_PHYSICIAN, INSTITUTION, BIRTH_DATE, STUDY_DATE}


def new_uid() -> str:
    """A fresh, long, unique UID (recorded as planted PHI: UIDs must never leak)."""
    uid = f"1.2.826.0.1.3680043.9.7433.{next(_uid_counter)}.{random.getrandbits(64)}"
    _PLANTED.add(uid)
    return uid


def planted_values() -> set[str]:
    """Every identifying value written so far that must never appear in results."""
    return {v for v in _PLANTED if v}


def _base(
    sop_class: str,
    modality: str,
    *,
    patient_id: str,
    accession: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
) -> Dataset:
    sop_uid = sop_uid or new_uid()
    _PLANTED.update({patient_id, accession, study_uid, series_uid, sop_uid})
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = REFERRING_PHYSICIAN
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.SeriesDescription = f"{PHI_MARKER} free text series description"
    ds.StudyID = f"{PHI_MARKER}-S1"
    ds.Manufacturer = "ACME Imaging"
    ds.ManufacturerModelName = "Model 9"
    ds.DeviceSerialNumber = f"{PHI_MARKER}-SN-991"
    ds.StationName = f"{PHI_MARKER}STATION"
    ds.SeriesNumber = 1
    return ds


def _set_pixels(
    ds: Dataset,
    pixels: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    photometric: str,
) -> None:
    rows, cols = pixels.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = np.int16 if signed else np.uint16
    lo, hi = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
        if signed
        else (0, 2**bits_stored - 1)
    )
    if pixels.min() < lo or pixels.max() > hi:
        raise ValueError("test pixels do not fit BitsStored")
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def asymmetric_pattern(rows: int, cols: int, *, maximum: int = 4000) -> np.ndarray:
    """A pattern that identifies orientation: a gradient plus a bright top-left block and a
    mid-level bottom-right block; every flip or transpose changes it."""
    r, c = np.mgrid[0:rows, 0:cols]
    img = (r * 7 + c * 3) % 997
    img[: max(1, rows // 4), : max(1, cols // 3)] = maximum
    img[-max(1, rows // 5) :, -max(1, cols // 6) :] = maximum // 2
    return img.astype(np.int32)


def write_projection(
    path: str | Path,
    *,
    patient_id: str,
    accession: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "DX",
    pixels: np.ndarray | None = None,
    rows: int = 24,
    cols: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    pixel_spacing: Sequence[float] | None = None,
    imager_pixel_spacing: Sequence[float] | None = (0.15, 0.1),
    orientation: Sequence[float] | None = None,
    position: Sequence[float] | None = None,
    view_position: str = "PA",
    body_part: str = "CHEST",
    extra: dict | None = None,
) -> Path:
    """Write one 2D projection image (DX, CR, MG...) and return its path.

    `pixels` (rows, cols) are the stored values; by default `asymmetric_pattern`.
    Spacings are (between rows, between columns) in mm. `orientation`/`position` are
    ImageOrientationPatient/ImagePositionPatient, absent by default as in most DX files.
    """
    sop_class = {
        "CR": ComputedRadiographyImageStorage,
        "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    }.get(modality, DigitalXRayImageStorageForPresentation)
    ds = _base(
        sop_class,
        modality,
        patient_id=patient_id,
        accession=accession,
        study_uid=study_uid or new_uid(),
        series_uid=series_uid or new_uid(),
        sop_uid=sop_uid,
    )
    if pixels is None:
        pixels = asymmetric_pattern(rows, cols)
    _set_pixels(ds, pixels, bits_stored=bits_stored, signed=signed, photometric=photometric)
    ds.InstanceNumber = 1
    ds.ViewPosition = view_position
    ds.BodyPartExamined = body_part
    ds.KVP = 110
    ds.Exposure = 4
    ds.PresentationIntentType = "FOR PRESENTATION"
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_pixel_spacing]
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    return _save(ds, Path(path))


def rotation_cosines(angle_deg: float, axis: str = "x") -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines of an axial plane rotated by `angle_deg` about an LPS axis."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]
    return rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])


def write_volume(
    folder: str | Path | Sequence[str | Path],
    *,
    patient_id: str,
    accession: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    n_slices: int = 5,
    rows: int = 12,
    cols: int = 10,
    pixel_spacing: Sequence[float] = (0.8, 0.6),
    slice_positions: Sequence[float] | None = None,
    slice_gap: float = 2.5,
    row_cosines: Sequence[float] = (1, 0, 0),
    col_cosines: Sequence[float] = (0, 1, 0),
    origin: Sequence[float] = (-30.0, -40.0, 15.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    bits_stored: int = 12,
    shuffle: bool = True,
    random_names: bool = True,
    instance_numbers: Sequence[int] | None = None,
    rng: random.Random | None = None,
    extra: dict | None = None,
    shear: Sequence[float] | None = None,
    value_offset: int = 0,
) -> list[Path]:
    """Write a CT/MR series of `n_slices` parallel slices and return the file paths.

    Slice k sits at ``origin + slice_positions[k] * normal`` (normal = row x col cosines);
    by default positions are ``k * slice_gap``. Files go to `folder`, or round-robin over
    several folders when a sequence of folders is given (one series across folders). With
    `shuffle`, slices are written in random order under random file names. The stored
    value of voxel (slice k, row r, col c) is ``1000 + 100*k + 7*r + c`` (plus 1 for r<2
    and c<3 to mark the top-left corner) + `value_offset`, so tests can check every axis.
    `shear` (LPS vector) shifts slice k in-plane by ``slice_positions[k] * shear`` (a tilted
    CT gantry); `extra` values of None delete the element (e.g. RescaleSlope).
    """
    rng = rng or random.Random(0)
    folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    frame_uid = new_uid()
    r = np.asarray(row_cosines, float)
    c = np.asarray(col_cosines, float)
    n = np.cross(r, c)
    positions = (
        list(slice_positions)
        if slice_positions is not None
        else [k * slice_gap for k in range(n_slices)]
    )
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    order = list(range(len(positions)))
    if shuffle:
        rng.shuffle(order)
    paths = []
    for written, k in enumerate(order):
        ds = _base(
            sop_class,
            modality,
            patient_id=patient_id,
            accession=accession,
            study_uid=study_uid,
            series_uid=series_uid,
        )
        rr, cc = np.mgrid[0:rows, 0:cols]
        pixels = 1000 + 100 * k + 7 * rr + cc + value_offset
        pixels[:2, :3] += 1
        _set_pixels(ds, pixels, bits_stored=bits_stored, signed=signed, photometric="MONOCHROME2")
        ipp = np.asarray(origin, float) + positions[k] * n
        if shear is not None:
            ipp = ipp + positions[k] * np.asarray(shear, float)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_gap:g}"
        ds.FrameOfReferenceUID = frame_uid
        _PLANTED.add(frame_uid)
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        ds.AcquisitionNumber = 1
        ds.SliceLocation = f"{positions[k]:.4f}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if modality == "CT":
            ds.KVP = 120
            ds.ConvolutionKernel = "B30f"
        else:
            ds.MagneticFieldStrength = 3
            ds.RepetitionTime = 500
            ds.EchoTime = 12
            ds.FlipAngle = 90
        for key, v in (extra or {}).items():
            if v is None:
                delattr(ds, key)
            else:
                setattr(ds, key, v)
        name = f"{rng.getrandbits(40):010x}" if random_names else f"slice{k:03d}.dcm"
        paths.append(_save(ds, folders[written % len(folders)] / name))
    return paths


def enhanced_value(k: int, r: int, c: int, echo: int = 0, time: int = 0) -> int:
    """Stored value of `write_enhanced` at position index k, row r, column c."""
    return 1000 + 100 * k + 7 * r + c + 30 * echo + 500 * time + (1 if r < 2 and c < 3 else 0)


def write_enhanced(
    path: str | Path,
    *,
    patient_id: str,
    accession: str,
    modality: str = "MR",
    n_slices: int = 4,
    echo_times: Sequence[float] = (10.0,),
    n_times: int = 1,
    rows: int = 12,
    cols: int = 10,
    pixel_spacing: Sequence[float] = (0.8, 0.6),
    slice_gap: float = 2.5,
    row_cosines: Sequence[float] = (1, 0, 0),
    col_cosines: Sequence[float] = (0, 1, 0),
    origin: Sequence[float] = (-30.0, -40.0, 15.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    shuffle: bool = True,
    rng: random.Random | None = None,
) -> Path:
    """One enhanced (multi-frame) MR or CT file: n_slices x echoes x time points frames.

    Geometry is in the shared functional groups (PlaneOrientationSequence,
    PixelMeasuresSequence, PixelValueTransformationSequence) and per frame
    (PlanePositionSequence, FrameContentSequence with StackID "1", InStackPositionNumber,
    TemporalPositionIndex, MREchoSequence for MR), with a DimensionIndexSequence (stack,
    in-stack position, temporal position, echo time for MR) as dcm2niix needs to sort. Frames are stored in random order with
    `shuffle`. Stored values: `enhanced_value(k, r, c, echo index, time index)`.
    """
    rng = rng or random.Random(1)
    sop_class = "1.2.840.10008.5.1.4.1.1.4.1" if modality == "MR" else (
        "1.2.840.10008.5.1.4.1.1.2.1")  # fmt: skip
    ds = _base(sop_class, modality, patient_id=patient_id, accession=accession,
               study_uid=new_uid(), series_uid=new_uid())  # fmt: skip
    frame_uid = new_uid()
    ds.FrameOfReferenceUID = frame_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M" if modality == "MR" else "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    r = np.asarray(row_cosines, float)
    c = np.asarray(col_cosines, float)
    n = np.cross(r, c)
    frames = [(k, e, t) for t in range(n_times) for e in range(len(echo_times))
              for k in range(n_slices)]  # fmt: skip
    if shuffle:
        rng.shuffle(frames)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    measures.SliceThickness = f"{slice_gap:g}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    transform = Dataset()
    transform.RescaleSlope = f"{slope:g}"
    transform.RescaleIntercept = f"{intercept:g}"
    transform.RescaleType = "US" if modality == "MR" else "HU"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    dimension_uid = new_uid()
    dimensions = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111),
                           (0x00209128, 0x00209111), (0x00189082, 0x00189114))[
                               : 4 if modality == "MR" else 3]:  # fmt: skip
        dim = Dataset()
        dim.DimensionOrganizationUID = dimension_uid
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = group
        dimensions.append(dim)
    ds.DimensionIndexSequence = DicomSequence(dimensions)
    per_frame = []
    stack = []
    rr, cc = np.mgrid[0:rows, 0:cols]
    for k, e, t in frames:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [
            f"{v:.6f}" for v in np.asarray(origin, float) + k * slice_gap * n
        ]
        item.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = t + 1
        content.DimensionIndexValues = [1, k + 1, t + 1, e + 1][: len(dimensions)]
        item.FrameContentSequence = DicomSequence([content])
        if modality == "MR":
            echo = Dataset()
            echo.EffectiveEchoTime = float(echo_times[e])
            item.MREchoSequence = DicomSequence([echo])
        per_frame.append(item)
        pixels = np.vectorize(enhanced_value)(k, rr, cc, e, t)
        stack.append(pixels.astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(np.stack(stack)).tobytes()
    if modality == "MR":
        ds.MagneticFieldStrength = 3
    else:
        ds.KVP = 120
    _PLANTED.add(frame_uid)
    return _save(ds, Path(path))


def write_legacy_multiframe(
    path: str | Path,
    *,
    patient_id: str,
    accession: str,
    n_frames: int = 3,
    rows: int = 12,
    cols: int = 10,
    spacing_between_slices: float | None = 2.5,
    origin: Sequence[float] = (-30.0, -40.0, 15.0),
) -> Path:
    """A legacy (non-enhanced) multi-frame CT: NumberOfFrames, one ImagePositionPatient
    (frame 0), axial orientation, SpacingBetweenSlices, no functional groups. Stored value
    of frame k: ``1000 + 100*k + 7*r + c`` (+1 for r<2 and c<3), as `write_volume`."""
    ds = _base(CTImageStorage, "CT", patient_id=patient_id, accession=accession,
               study_uid=new_uid(), series_uid=new_uid())  # fmt: skip
    rr, cc = np.mgrid[0:rows, 0:cols]
    frames = []
    for k in range(n_frames):
        pixels = 1000 + 100 * k + 7 * rr + cc
        pixels[:2, :3] += 1
        frames.append(pixels.astype(np.uint16))
    _set_pixels(ds, frames[0], bits_stored=12, signed=False, photometric="MONOCHROME2")
    ds.PixelData = np.ascontiguousarray(np.stack(frames)).tobytes()
    ds.NumberOfFrames = n_frames
    ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.8", "0.6"]
    ds.SliceThickness = "2.5"
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = f"{spacing_between_slices:g}"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.InstanceNumber = 1
    return _save(ds, Path(path))


def write_sr(path: str | Path, *, patient_id: str, accession: str) -> Path:
    """A Basic Text SR (a report, no pixels)."""
    ds = _base(
        BasicTextSRStorage,
        "SR",
        patient_id=patient_id,
        accession=accession,
        study_uid=new_uid(),
        series_uid=new_uid(),
    )
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = f"{PHI_MARKER} report text: no acute findings"
    ds.ContentSequence = DicomSequence([item])
    return _save(ds, Path(path))


def write_dicomdir(path: str | Path) -> Path:
    """A minimal DICOMDIR: Media Storage Directory SOP class, an empty record sequence."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "ZQXSET"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence([])
    return _save(ds, Path(path))


def write_text(path: str | Path, text: str = "export log: ZQX nothing to see\n") -> Path:
    """A non-DICOM file such as the README or log a PACS export often contains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncate(
    path: str | Path, keep_bytes: int | None = None, *, keep_fraction: float = 0.6
) -> Path:
    """Cut a DICOM file short in place (as an interrupted copy does)."""
    path = Path(path)
    data = path.read_bytes()
    n = keep_bytes if keep_bytes is not None else int(len(data) * keep_fraction)
    path.write_bytes(data[:n])
    return path


def duplicate(src: str | Path, dst: str | Path) -> Path:
    """A byte copy of a file under another name (same SOPInstanceUID)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def assert_phi_free(folder: str | Path, rels: Iterable[str]) -> None:
    """Assert that no file under `folder` (gzip files decompressed) contains the PHI
    marker, a planted identifier (6+ characters), a relative path or a folder name."""
    rels = list(rels)
    needles = {v for v in planted_values() if len(v) >= 6}
    parts = {part for rel in rels for part in Path(rel).parts if len(part) >= 4}
    needles |= (set(rels) | parts) - {"DICOMDIR"}  # the reason text names the file type
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    assert files, f"no files under {folder}"
    for path in files:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        text = data.decode("latin-1")
        assert PHI_MARKER.lower() not in text.lower(), path
        for needle in needles:
            assert needle not in text, (path.name, needle)


def read(path: str | Path) -> Dataset:
    return pydicom.dcmread(path)


def write_labels(path: str | Path, rows: Iterable[Sequence[str]], header: Sequence[str]) -> Path:
    """Write a CSV (or TSV when the name ends in .tsv) from string rows, verbatim."""
    path = Path(path)
    sep = "\t" if path.suffix == ".tsv" else ","
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------- a whole export
def build_export(root: str | Path) -> dict:
    """Write a small, messy PACS export under `root` and describe it.

    Contents (PatientIDs "ZQXPAT..." unless noted):
      A  DX PA, accession "007731" (leading zeros), MONOCHROME2      -> label 1
      B  CR, accession "7731", MONOCHROME1 with rescale              -> label 0
      C  CT axial, 5 slices in two folders + MR oblique, 4 slices, in one of those
         folders, same study, accession "ZQXACC100"                   -> label 1
      D  DX series with two instances (PA, LAT), accession "ZQXACC200" -> label 0
      E  DX without a row in the labels table                         -> excluded
      F  DX without PatientID                                         -> quarantined unit
      G  CT whose slices disagree on AccessionNumber                  -> quarantined unit
      plus an SR, a DICOMDIR, a text file, a hidden file, a DICOM truncated in its pixel
      data, one truncated in its header, and a byte copy of A (duplicate instance).
    Returns a dict of the identifiers and paths the tests assert on.
    """
    root = Path(root)
    rng = random.Random(1234)
    folder = root / "Zqx_Doe_Johnathan" / "export 2019"
    info: dict = {"root": root}
    a_study, a_series = new_uid(), new_uid()
    info["A"] = dict(
        patient="ZQXPAT001",
        accession="007731",
        study=a_study,
        series=a_series,
        path=write_projection(
            folder / "IM0001",
            patient_id="ZQXPAT001",
            accession="007731",
            study_uid=a_study,
            series_uid=a_series,
        ),
    )
    b_series = new_uid()
    info["B"] = dict(
        patient="ZQXPAT002",
        accession="7731",
        series=b_series,
        path=write_projection(
            root / "ZqxSmith" / "cr.dcm",
            patient_id="ZQXPAT002",
            accession="7731",
            series_uid=b_series,
            modality="CR",
            photometric="MONOCHROME1",
            slope=2,
            intercept=-100,
            pixel_spacing=(0.2, 0.2),
        ),
    )
    c_study, ct_series, mr_series = new_uid(), new_uid(), new_uid()
    ct_dirs = [root / "ZqxPatientC" / "part1", root / "ZqxPatientC" / "deeper" / "part2"]
    info["C"] = dict(
        patient="ZQXPAT003",
        accession="ZQXACC100",
        study=c_study,
        ct_series=ct_series,
        mr_series=mr_series,
        ct_paths=write_volume(
            ct_dirs, patient_id="ZQXPAT003", accession="ZQXACC100", study_uid=c_study,
            series_uid=ct_series, n_slices=5, rng=rng,
        ),
        mr_paths=write_volume(
            ct_dirs[0], patient_id="ZQXPAT003", accession="ZQXACC100", study_uid=c_study,
            series_uid=mr_series, modality="MR", n_slices=4, rng=rng,
            row_cosines=rotation_cosines(20, "x")[0], col_cosines=rotation_cosines(20, "x")[1],
        ),
    )  # fmt: skip
    d_study, d_series = new_uid(), new_uid()
    d_sops = [new_uid(), new_uid()]
    info["D"] = dict(
        patient="ZQXPAT004",
        accession="ZQXACC200",
        series=d_series,
        sops=d_sops,
        paths=[
            write_projection(
                root / "misc" / f"{rng.getrandbits(32):08x}",
                patient_id="ZQXPAT004",
                accession="ZQXACC200",
                study_uid=d_study,
                series_uid=d_series,
                sop_uid=sop,
                view_position=view,
            )
            for sop, view in zip(d_sops, ["PA", "LL"], strict=True)
        ],
    )
    e_series = new_uid()
    info["E"] = dict(
        series=e_series,
        path=write_projection(
            root / "misc" / "e.dcm", patient_id="ZQXPAT005", accession="ZQXACC300",
            series_uid=e_series,
        ),
    )  # fmt: skip
    f_series = new_uid()
    info["F"] = dict(
        series=f_series,
        path=write_projection(
            root / "misc" / "f.dcm", patient_id="", accession="ZQXACC400", series_uid=f_series
        ),
    )
    g_series = new_uid()
    g_paths = write_volume(
        root / "g", patient_id="ZQXPAT007", accession="ZQXACC500", series_uid=g_series,
        n_slices=3, rng=rng,
    )  # fmt: skip
    ds = pydicom.dcmread(g_paths[0])
    ds.AccessionNumber = "ZQXACC501"
    _PLANTED.add("ZQXACC501")
    ds.save_as(g_paths[0], enforce_file_format=True)
    info["G"] = dict(series=g_series, paths=g_paths)
    info["sr"] = write_sr(root / "misc" / "report.dcm", patient_id="ZQXPAT001", accession="007731")
    info["dicomdir"] = write_dicomdir(root / "DICOMDIR")
    info["text"] = write_text(root / "Zqx_Doe_Johnathan" / "README.TXT")
    info["hidden"] = write_text(root / "misc" / ".DS_Store", "hidden")
    info["truncated"] = truncate(
        write_projection(root / "misc" / "cut_pixels.dcm", patient_id="ZQXPAT008",
                         accession="ZQXACC600", rows=32, cols=32),
        keep_fraction=0.7,
    )  # fmt: skip
    info["truncated_header"] = truncate(
        write_projection(root / "misc" / "cut_header.dcm", patient_id="ZQXPAT009",
                         accession="ZQXACC700"),
        keep_bytes=400,
    )  # fmt: skip
    info["duplicate"] = duplicate(info["A"]["path"], root / "copy_of_A" / "IM0001")
    info["labels"] = [
        ("007731", "1"),
        ("7731", "0"),
        ("ZQXACC100", "1"),
        ("ZQXACC200", "0"),
        ("ZQXACC400", "1"),
        ("ZQXACC500", "0"),
        ("ZQXNOMATCH", "1"),
    ]
    return info


def write_volumes(
    folder: str | Path,
    volumes: Sequence[dict],
    *,
    n_slices: int = 3,
    offset_step: int = 300,
    rng_seed: int = 0,
    **kwargs,
) -> list[list[Path]]:
    """Several volumes of one series at the same slice positions (time points, b-values,
    echoes, repeats...): volume v is `write_volume(folder, n_slices=n_slices, **kwargs)`
    with `volumes[v]` as its `extra` header values, `value_offset` v * `offset_step` (so a
    test can tell the volumes apart and check their order) and InstanceNumbers running on
    across volumes, as scanners write them. Pass the same `series_uid`/`study_uid` in
    kwargs. Returns the file paths of each volume."""
    out = []
    for v, extra in enumerate(volumes):
        out.append(
            write_volume(
                folder,
                n_slices=n_slices,
                value_offset=v * offset_step,
                instance_numbers=[v * n_slices + k + 1 for k in range(n_slices)],
                rng=random.Random(rng_seed + v),
                extra=dict(extra),
                **kwargs,
            )  # fmt: skip
        )
    return out


def dicom_corner_ras(path: str | Path) -> tuple[np.ndarray, float]:
    """(RAS world position in mm, rescaled value) of the first stored pixel (row 0,
    column 0) of a single-frame DICOM file: ImagePositionPatient with x and y negated, and
    the stored value times RescaleSlope plus RescaleIntercept."""
    ds = pydicom.dcmread(path)
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    value = float(ds.pixel_array[0, 0]) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    return lps * np.array([-1.0, -1.0, 1.0]), value
