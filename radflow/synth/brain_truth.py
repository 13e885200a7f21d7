"""Lesion ground truth as a user would have it: a NIfTI label map on the grid dcm2niix
gives the reference series, or a DICOM Segmentation that references its instances.

Label values follow BraTS 2013-2015 (`brain_phantom.LESION_LABELS`: 1 necrosis, 2 oedema,
4 enhancing; 0 background). A label map here is (slices, rows, columns) in the reference
series' DICOM layout: slice k in order along the normal, row j and column i as stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from radflow.dicom import radflow_version
from radflow.dicom.nifti import write_nifti
from radflow.dicom.reader import ras_affine
from radflow.synth.brain_phantom import LESION_LABELS, SliceGeometry

#: DICOM SEG segment labels, numbered 1, 2, 3 in this order, of the LESION_LABELS zones.
SEGMENT_NAMES = ("necrosis", "oedema", "enhancing")
_SEGMENT_TYPES = (codes.SCT.Necrosis, codes.SCT.Edema, codes.SCT.Neoplasm)


def dcm2niix_grid(geometry: SliceGeometry) -> np.ndarray:
    """The RAS affine of the NIfTI dcm2niix writes for a 2D-acquired stack of `geometry`:
    voxel (i, j, k) = column i, row rows-1-j (dcm2niix flips the rows), slice k in order
    along the normal. (dcm2niix turns 3D acquisitions to the closest RAS orientation
    instead; the reference series is always 2D.)"""
    affine = ras_affine(
        np.asarray(geometry.row_cosine),
        np.asarray(geometry.col_cosine),
        geometry.normal,
        geometry.row_spacing_mm,
        geometry.col_spacing_mm,
        geometry.slice_step_mm,
        np.asarray(geometry.origin_lps),
    )
    flip_rows = np.eye(4)
    flip_rows[1, 1], flip_rows[1, 3] = -1, geometry.shape[1] - 1
    return affine @ flip_rows


def write_label_nifti(path: Path, label: np.ndarray, geometry: SliceGeometry) -> None:
    """`label` (uint8) as a .nii.gz on dcm2niix's grid of the reference series."""
    write_nifti(path, np.ascontiguousarray(label[:, ::-1, :]), dcm2niix_grid(geometry))


def reproducible_seg(*, date: str, time: str, dimension_uid: str, **kwargs) -> hd.seg.Segmentation:
    """`hd.seg.Segmentation(**kwargs)` stamped with `date` and `time` (content, instance
    creation, contribution) and `dimension_uid` in place of what highdicom takes from the
    clock and a random UID: equal arguments give equal bytes."""
    # highdicom logs every module it copies at INFO: hundreds of lines per job log
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        seg = hd.seg.Segmentation(content_date=date, content_time=time, **kwargs)
    finally:
        logger.setLevel(level)
    seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
    for item in seg.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    return seg


def write_label_seg(
    path: Path,
    label: np.ndarray,
    reference: Sequence[Dataset],
    *,
    series_uid: str,
    sop_uid: str,
    dimension_uid: str,
    date: str,
    time: str,
) -> None:
    """`label` as a BINARY DICOM Segmentation of `reference` (the series' datasets in
    slice order), one segment per zone (SEGMENT_NAMES), empty frames omitted unless all
    are empty. `date` and `time` stamp the content, and with `dimension_uid` replace what
    highdicom would take from the clock and a random UID, so the bytes are reproducible."""
    segment_numbers = np.zeros(label.shape, dtype=np.uint8)
    for number, value in enumerate(LESION_LABELS, start=1):
        segment_numbers[label == value] = number
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, (name, kind) in enumerate(
            zip(SEGMENT_NAMES, _SEGMENT_TYPES, strict=True), start=1
        )
    ]
    seg = reproducible_seg(
        date=date,
        time=time,
        dimension_uid=dimension_uid,
        source_images=list(reference),
        pixel_array=segment_numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=900,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="radflow",
        manufacturer_model_name="synthetic annotation",
        software_versions=radflow_version(),
        device_serial_number="0",
        content_label="LESIONS",
        content_description="lesion zones (BraTS)",
        series_description="lesion segmentation",
        omit_empty_frames=bool(label.any()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
