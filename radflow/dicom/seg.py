"""DICOM Segmentation objects (SEG) as ground-truth masks: header checks for the index,
a label map in world space for conversion.

Route (`seg_label_image`): highdicom reads the SEG's segments on the frames of its source
series, instance by instance (`Segmentation.get_pixels_by_source_instance`: frames are
matched to source images by SOP Instance UID, so frames omitted because they were empty,
sparse slices and any frame order need no guessing of the slice spacing). The label
planes are then placed in world space by the *source* instances' own geometry
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing), checked against the SEG's
plane positions frame by frame: a SEG whose frames are not on its source's pixels fails
rather than landing shifted. The result is a SimpleITK image in world (LPS) coordinates,
which `radflow.cases.mask_onto` copies or resamples onto the case's reference grid, as it
does for a label image file.

Label values: segment number N becomes label N, unless a mapping {SegmentLabel: value}
is given (config `data.mask_labels`; value 0 drops the segment). Overlapping segments
fail the case (one label map cannot hold them); a FRACTIONAL segment counts where its
value exceeds one half.

Only the SEG's structure is read into messages: segment numbers, counts, millimetres;
never a UID, a label text or a name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from radflow.deid import quiet_pydicom
from radflow.dicom.headers import ORIENTATION_TOLERANCE, SAME_POSITION_MM
from radflow.dicom.reader import ConversionError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: In-plane shift between source slices beyond which the source is not one straight stack.
IN_PLANE_TOLERANCE_MM = 0.05


@dataclass(frozen=True)
class SegHeader:
    """What the index needs of a SEG (identifiers in memory only)."""

    referenced_series: tuple[str, ...]  # SeriesInstanceUIDs of its source series
    patient: str  # value of the study's patient key in the SEG ("" if absent)


def read_seg_header(path: str, patient_key: str) -> SegHeader | None:
    """The header of a DICOM SEG file; None if the file is not DICOM. Raises ValueError
    (PHI-free message) for a DICOM file that is not a SEG."""
    tags = ["SOPClassUID", "ReferencedSeriesSequence", patient_key]
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        return None
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    if sop_class != SEG_SOP_CLASS:
        name = pydicom.uid.UID(sop_class).name if sop_class else "no SOP Class UID"
        name = "an unknown SOP class" if name == sop_class else name
        raise ValueError(f"a DICOM file that is not a SEG ({name})")
    series = tuple(
        str(item.get("SeriesInstanceUID", "")).strip()
        for item in ds.get("ReferencedSeriesSequence") or []
    )
    return SegHeader(tuple(s for s in series if s), str(ds.get(patient_key, "") or "").strip())


def _vector(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise ConversionError(f"a DICOM SEG frame or source instance without {keyword}")
    return np.array([float(v) for v in value])


def _source_stack(paths: Sequence[str]):
    """(SOP Instance UIDs sorted along the slice normal, their positions (n, 3), row and
    column cosines, pixel spacing (rows, columns), slice step mm, rows, columns) of the
    source series' files; raises ConversionError where they are not one regular stack."""
    tags = ["SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
            "PixelSpacing", "Rows", "Columns", "NumberOfFrames"]  # fmt: skip
    with quiet_pydicom():
        headers = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=tags) for p in paths]
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in headers):
        raise ConversionError("DICOM SEG of a multi-frame (enhanced) source series: not "
                              "supported; give the mask as a label image (NIfTI)")  # fmt: skip
    orientation = _vector(headers[0], "ImageOrientationPatient", 6)
    if any(np.abs(_vector(ds, "ImageOrientationPatient", 6) - orientation).max()
           >= ORIENTATION_TOLERANCE for ds in headers):  # fmt: skip
        raise ConversionError("the DICOM SEG's source instances differ in orientation")
    row_cosines, col_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, col_cosines)
    positions = np.array([_vector(ds, "ImagePositionPatient", 3) for ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    along = positions @ normal
    steps = np.diff(along)
    step = float(steps.mean()) if len(steps) else 1.0
    if len(steps) and (steps.min() < SAME_POSITION_MM or np.ptp(steps) > SAME_POSITION_MM):
        raise ConversionError(
            "the DICOM SEG's source series is not a regular stack (slice steps "
            f"{steps.min():.3g}-{steps.max():.3g} mm): placing its frames needs one"
        )
    in_plane = positions - np.outer(along - along[0], normal) - positions[0]
    if np.abs(in_plane).max() > IN_PLANE_TOLERANCE_MM:
        raise ConversionError("the DICOM SEG's source slices are shifted in-plane (a tilted "
                              "stack): placing its frames needs a straight one")  # fmt: skip
    spacing = _vector(headers[0], "PixelSpacing", 2)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    if any((int(ds.Rows), int(ds.Columns)) != (rows, columns) for ds in headers):
        raise ConversionError("the DICOM SEG's source instances differ in size")
    uids = [str(headers[i].SOPInstanceUID) for i in order]
    return uids, positions, row_cosines, col_cosines, spacing, step, rows, columns


def _check_frames_on_source(seg, position_of: Mapping[str, np.ndarray], rows: int,
                            columns: int) -> None:  # fmt: skip
    """Raise ConversionError unless every SEG frame that names a source instance lies on
    that instance's plane (its ImagePositionPatient) and the SEG has the source's size."""
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise ConversionError(
            f"the DICOM SEG's frames are {seg.Rows}x{seg.Columns} pixels, its source "
            f"instances {rows}x{columns}: they are not on the source's pixels"
        )
    worst = 0.0
    for item in seg.get("PerFrameFunctionalGroupsSequence") or []:
        plane = item.get("PlanePositionSequence")
        derivation = item.get("DerivationImageSequence")
        if not plane or not derivation or not derivation[0].get("SourceImageSequence"):
            continue
        uid = str(derivation[0].SourceImageSequence[0].get("ReferencedSOPInstanceUID", ""))
        if uid in position_of:
            offset = _vector(plane[0], "ImagePositionPatient", 3) - position_of[uid]
            worst = max(worst, float(np.abs(offset).max()))
    if worst > IN_PLANE_TOLERANCE_MM:
        raise ConversionError(
            f"the DICOM SEG's frames lie up to {worst:.3g} mm from their source instances' "
            "positions: they are not on the source's pixels"
        )


def _label_values(seg, mask_labels: Mapping[str, int] | None) -> dict[int, int]:
    """{segment number: label value} (the number itself, or data.mask_labels by
    SegmentLabel)."""
    values = {}
    for item in seg.get("SegmentSequence") or []:
        number = int(item.SegmentNumber)
        if mask_labels is None:
            values[number] = number
            continue
        label = str(item.get("SegmentLabel", "")).strip()
        if label not in mask_labels:
            raise ConversionError(f"segment {number}'s SegmentLabel is not a key of "
                                  "data.mask_labels; add it (0 drops the segment)")  # fmt: skip
        values[number] = int(mask_labels[label])
    if not values:
        raise ConversionError("the DICOM SEG describes no segments")
    return values


def seg_label_image(
    seg_path: str | os.PathLike,
    source_paths: Sequence[str],
    mask_labels: Mapping[str, int] | None = None,
):
    """The label map of a DICOM SEG as a SimpleITK image (uint16) in world space, on the
    grid of its source series (`source_paths`: that series' single-frame files). Raises
    ConversionError with a PHI-free reason; see the module docstring for the route."""
    import highdicom as hd
    import SimpleITK as sitk

    uids, positions, row_cos, col_cos, spacing, step, rows, columns = _source_stack(source_paths)
    try:
        with quiet_pydicom():
            seg = hd.seg.segread(os.fspath(seg_path))
    except Exception as exc:
        raise ConversionError(f"unreadable DICOM SEG ({type(exc).__name__})") from None
    values = _label_values(seg, mask_labels)
    _check_frames_on_source(seg, dict(zip(uids, positions, strict=True)), rows, columns)
    numbers = sorted(values)
    try:
        with quiet_pydicom():
            planes = seg.get_pixels_by_source_instance(
                uids, segment_numbers=numbers, combine_segments=False,
                ignore_spatial_locations=True, assert_missing_frames_are_empty=True,
                rescale_fractional=True,
            )  # fmt: skip
    except Exception as exc:  # highdicom's messages quote UIDs: only the type goes out
        raise ConversionError(
            "the DICOM SEG's frames could not be matched to its source instances "
            f"({type(exc).__name__}): it must reference them frame by frame"
        ) from None
    present = planes > 0.5 if seg.segmentation_type.value == "FRACTIONAL" else planes > 0
    overlap = int((present.sum(axis=-1) > 1).sum())
    if overlap:
        raise ConversionError(f"the DICOM SEG's segments overlap in {overlap} pixels: one "
                              "label map needs non-overlapping segments")  # fmt: skip
    lookup = np.array([values[n] for n in numbers], dtype=np.uint16)
    label = (present.astype(np.uint16) * lookup).sum(axis=-1, dtype=np.uint16)
    image = sitk.GetImageFromArray(label)  # (slice, row, column) -> index (x, y, z)
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetSpacing((float(spacing[1]), float(spacing[0]), float(step)))
    normal = np.cross(row_cos, col_cos)
    image.SetDirection(tuple(np.column_stack([row_cos, col_cos, normal]).ravel()))
    return image
