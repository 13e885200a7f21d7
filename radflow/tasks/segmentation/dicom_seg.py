"""A segmentation prediction as a DICOM Segmentation (SEG) that overlays its source series.

A prediction lives on the voxel grid of the converted NIfTI (`radflow.geometry.
restore_native`, `write_label_nifti`). `labels_on_source_frames` carries it onto the pixels
of the source DICOM series through world coordinates only (every source pixel's centre
from ImagePositionPatient, ImageOrientationPatient and PixelSpacing, LPS turned into RAS,
through the inverse NIfTI affine, nearest voxel), so any acquisition (axial, sagittal,
oblique, dcm2niix's flipped rows, any slice order) lands right. `write_prediction_seg`
writes those frames as a BINARY SEG with highdicom, one segment per label value.

Identifiers: the SEG must reference its source to overlay it in 3D Slicer or OHIF, so it
keeps the source's StudyInstanceUID, FrameOfReferenceUID, SeriesInstanceUID and SOP
Instance UIDs (ReferencedSeriesSequence, per-frame source references). Those UIDs link
the SEG to the hospital's study: radflow writes these SEGs into its *private* folder,
never into results/. Everything else that identifies a person, an event or a place is
left out by construction: highdicom copies the Patient, General Study and Patient Study
modules and the source's acquisition equipment (institution, station, device serial
number) from the first source image, so it is given a whitelisted copy of each source
header instead (geometry, UIDs, modality, patient sex), with PatientName and PatientID
set to the case's pseudonym and birth date, accession number, study ID, study date and
time and referring physician empty.

UIDs of the SEG (series, instance, dimension organisation) are `2.25.` UIDs hashed from a
seed: `uid_seed`, or by default the pseudonym, the prediction and the source instances, so
rewriting the same prediction gives the same object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from radflow.deid import quiet_pydicom
from radflow.dicom import radflow_version
from radflow.synth.brain_truth import reproducible_seg
from radflow.tables import atomic_path

#: LPS (DICOM) <-> RAS (NIfTI): x and y negated.
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
#: Namespace of the SEG's name-based UUIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "radflow:prediction-seg")
#: Segmented property types of segment names radflow knows (BraTS zones); others: Lesion.
_PROPERTY_TYPES = {
    "necrosis": codes.SCT.Necrosis,
    "oedema": codes.SCT.Edema,
    "edema": codes.SCT.Edema,
    "enhancing": codes.SCT.Neoplasm,
}
#: Source header elements highdicom needs to place and reference the SEG's frames; nothing
#: else of the source reaches the SEG (see the module docstring).
_SOURCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "Rows", "Columns", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "PatientSex", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)  # fmt: skip
#: Type 2 patient and study elements highdicom reads from the source: present, empty.
_EMPTIED_KEYWORDS = (
    "PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
    "ReferringPhysicianName",
)  # fmt: skip


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise ValueError(f"a source instance without {keyword} ({n} values)")
    return np.array([float(v) for v in value])


def labels_on_source_frames(
    labels_ijk: np.ndarray, affine_ras: np.ndarray, source_datasets: Sequence[Dataset]
) -> np.ndarray:
    """The label map `labels_ijk` (i, j, k; as `np.asarray(nib.load(p).dataobj)`, RAS
    `affine_ras`) sampled at every pixel of the single-frame `source_datasets`:
    (frames, rows, columns), frame f being `source_datasets[f]` (the order given, not
    re-sorted). Each pixel's centre (ImagePositionPatient + column * column spacing * row
    cosine + row * row spacing * column cosine, LPS, flipped to RAS) goes through the
    inverse affine to the nearest voxel; pixels beyond the grid get 0. Only world
    coordinates tie the two grids: any orientation, flip or slice order is fine."""
    labels = np.asarray(labels_ijk)
    if labels.ndim != 3:
        raise ValueError(f"labels of shape {labels.shape}: a 3D label map (i, j, k) is needed")
    if not source_datasets:
        raise ValueError("no source instances")
    rows, columns = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if any((int(ds.Rows), int(ds.Columns)) != (rows, columns) for ds in source_datasets):
        raise ValueError("the source instances differ in size")
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in source_datasets):
        raise ValueError("multi-frame source instances are not supported")
    to_voxel = np.linalg.inv(np.asarray(affine_ras, float))
    linear, offset = to_voxel[:3, :3], to_voxel[:3, 3]
    shape = np.array(labels.shape)
    row_index = np.arange(rows, dtype=float)[:, None, None]
    column_index = np.arange(columns, dtype=float)[None, :, None]
    frames = np.zeros((len(source_datasets), rows, columns), labels.dtype)
    for f, ds in enumerate(source_datasets):
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        between_rows, between_columns = _floats(ds, "PixelSpacing", 2)
        corner = _floats(ds, "ImagePositionPatient", 3)
        # voxel coordinates of pixel (0, 0) and their steps per column and per row
        origin = linear @ (corner * _LPS_TO_RAS) + offset
        per_column = linear @ (orientation[:3] * between_columns * _LPS_TO_RAS)
        per_row = linear @ (orientation[3:] * between_rows * _LPS_TO_RAS)
        ijk = np.rint(origin + column_index * per_column + row_index * per_row).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < shape), axis=-1)
        i, j, k = (ijk[..., axis][inside] for axis in range(3))
        frames[f][inside] = labels[i, j, k]
    return frames


def _uid(seed: str, role: str) -> str:
    """A `2.25.` UID that is a function of `seed` and `role` only (a name-based UUID;
    pydicom's generate_uid ignores its entropy sources under the 2.25 root)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{seed}:{role}').int}"


def _default_seed(labels: np.ndarray, affine: np.ndarray, sources: Sequence[Dataset],
                  parts: Sequence[object]) -> str:  # fmt: skip
    digest = hashlib.sha256()
    for part in (*parts, labels.shape, labels.dtype.str, np.asarray(affine, float).tobytes()):
        digest.update(repr(part).encode() + b"\0")
    digest.update(np.ascontiguousarray(labels).tobytes())
    for ds in sources:
        digest.update(str(ds.SOPInstanceUID).encode() + b"\0")
    return digest.hexdigest()


def _whitelisted(ds: Dataset, patient_pid: str) -> Dataset:
    """What highdicom may see of one source header (module docstring)."""
    kept = Dataset()
    for keyword in _SOURCE_KEYWORDS:
        if keyword in ds:
            kept[keyword] = ds[keyword]
    kept.PatientName = patient_pid
    kept.PatientID = patient_pid
    kept.PatientSex = ds.get("PatientSex", "")
    for keyword in _EMPTIED_KEYWORDS:
        setattr(kept, keyword, "")
    return kept


def write_prediction_seg(
    path: str | os.PathLike,
    labels_ijk: np.ndarray,
    affine_ras: np.ndarray,
    source_paths: Sequence[str | os.PathLike],
    *,
    segments: Mapping[int, str],
    patient_pid: str,
    algorithm_version: str,
    series_number: int = 901,
    series_description: str = "radflow prediction",
    uid_seed: str | None = None,
    created: dt.datetime | None = None,
) -> Path:
    """Write the prediction `labels_ijk` (on the converted NIfTI's grid, RAS `affine_ras`)
    as a BINARY DICOM SEG of the source series' single-frame files `source_paths`,
    atomically, and return `path`.

    `segments` {label value: segment name}: one segment per entry, numbered 1, 2, ... in
    order of label value, AUTOMATIC, by the algorithm "radflow" `algorithm_version`; a
    label value of the map not in `segments` raises ValueError. Frames are the source
    instances in the order given, empty frames omitted unless all are empty. The patient
    is `patient_pid` (a pseudonym) and nothing else identifying of the source is carried
    (module docstring). `uid_seed` fixes the SEG's UIDs (default: a hash of the pseudonym,
    the prediction and the source instances); `created` stamps content, instance creation
    and contribution date/time (default: now), so equal inputs give equal bytes."""
    labels = np.asarray(labels_ijk)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a label map must hold integers, not {labels.dtype}")
    values = sorted(int(v) for v in segments)
    if not values or values[0] <= 0:
        raise ValueError("segments must map label values > 0 to names")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *values})
    if unknown:
        raise ValueError(f"label values {unknown} are not in segments "
                         f"({', '.join(map(str, values))}); name them or remove them")  # fmt: skip
    with quiet_pydicom():
        headers = [pydicom.dcmread(os.fspath(p), stop_before_pixels=True) for p in source_paths]
    frames = labels_on_source_frames(labels, affine_ras, headers)
    lookup = np.zeros(max(values) + 1, np.uint16 if len(values) > 255 else np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    segment_numbers = lookup[frames]

    algorithm = hd.AlgorithmIdentificationSequence(
        name="radflow", family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segments[value],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_PROPERTY_TYPES.get(segments[value].lower(), codes.SCT.Lesion),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, start=1)
    ]
    parts = (
        patient_pid,
        algorithm_version,
        series_number,
        series_description,
        sorted(segments.items()),
    )
    seed = uid_seed if uid_seed is not None else _default_seed(labels, affine_ras, headers, parts)
    created = created or dt.datetime.now()
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    with quiet_pydicom():
        seg = reproducible_seg(
            date=date,
            time=time,
            dimension_uid=_uid(seed, "dimensions"),
            source_images=[_whitelisted(ds, patient_pid) for ds in headers],
            pixel_array=segment_numbers,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=_uid(seed, "series"),
            series_number=series_number,
            sop_instance_uid=_uid(seed, "instance"),
            instance_number=1,
            manufacturer="radflow",
            manufacturer_model_name="radflow",
            software_versions=radflow_version(),
            device_serial_number="0",
            content_label="PREDICTION",
            content_description=series_description,
            series_description=series_description,
            omit_empty_frames=bool(segment_numbers.any()),
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def reference_files(tables, dicom_root: str) -> dict[str, list[str]]:
    """Per case (series_pid), the absolute paths of the DICOM files of the series whose
    grid the converted image has (the reference channel: the first channel of the case's
    rows, as `case_jobs` orders them; the unit's files for a single-series unit), from
    the private shard tables (paths relative to `dicom_root`). Those files are what a
    DICOM SEG of a prediction references."""
    import pandas as pd

    from radflow import conventions as C
    from radflow.tables import read_tsv

    out: dict[str, list[str]] = {}
    for table in tables:
        table = read_tsv(table) if not isinstance(table, pd.DataFrame) else table
        if C.ROLE not in table.columns:  # single-series units: every file is an image
            table = table.assign(**{C.ROLE: C.ROLE_IMAGE})
        images = table[table[C.ROLE].fillna(C.ROLE_IMAGE).replace("", C.ROLE_IMAGE) == C.ROLE_IMAGE]
        for series_pid, group in images.groupby(C.SERIES_PID, sort=True):
            channel = group[C.CHANNEL].fillna("").iloc[0] if C.CHANNEL in group else ""
            if channel:
                group = group[group[C.CHANNEL] == channel]
            out[series_pid] = [os.path.join(dicom_root, p) for p in sorted(group[C.PATH])]
    return out
