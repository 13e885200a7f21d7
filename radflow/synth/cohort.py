"""The embedded demo cohort: synthetic chest radiographs written as real DICOM files.

`synthesize_cohort` writes:
- a DICOM folder: a nested tree of DX/CR files with random names (some without extension),
  realistic headers with fake PHI, varying PixelSpacing (0.14-0.2 mm), MONOCHROME1/2,
  Rescale Slope/Intercept, implicit/explicit VR, plus a few objects a real export
  contains and a study must survive: a structured report, a text file and a truncated
  DICOM file.
- a labels table (CSV): AccessionNumber -> finding ("nodule" / "no finding"), keyed like a
  hospital's reporting system export.
- a lesions table (CSV), the ground truth: AccessionNumber, row_px, col_px, diameter_mm of each
  nodule centre in the stored pixel grid (0-based).

Everything is a function of the seed: the same seed writes byte-identical files, whatever
the number of worker processes. Header fields, file names, folder layout, matrix size,
spacing, photometric interpretation, rescale, transfer syntax and exposure are drawn
independently of the label, so the label can only be learnt from the pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radflow.synth import phantom
from radflow.synth.export import (
    dataset_from,
    map_jobs,
    patient_identity,
    random_relpath,
    study_fields,
    uid,
    write_csv,
    write_dataset,
    write_junk,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage

POSITIVE = "nodule"
NEGATIVE = "no finding"

_DEVICES = [
    ("DX", "Acme Medical", "Radiance DR-500"),
    ("DX", "Borealis Imaging", "PolarView 3"),
    ("CR", "Cygnus Systems", "PlateReader CR-2"),
    ("DX", "Acme Medical", "Radiance DR-700"),
]


@dataclass(frozen=True)
class CohortSpec:
    """What to synthesise. Sizes are in pixels, spacings in mm."""

    n_patients: int = 150
    seed: int = 20261125
    prevalence: float = 0.45
    second_study_fraction: float = 0.3
    min_matrix_px: int = 1024
    max_matrix_px: int = 1400
    pixel_spacing_mm: tuple[float, float] = (0.14, 0.2)
    nodule_diameter_mm: tuple[float, float] = (16.0, 34.0)
    nodule_contrast: tuple[float, float] = (0.5, 0.95)
    max_nodules: int = 3
    n_junk_files: int = 3


@dataclass(frozen=True)
class _StudyPlan:
    patient_index: int
    study_index: int
    positive: bool


def plan_cohort(spec: CohortSpec) -> list[_StudyPlan]:
    """Which patients get one or two studies and which studies are positive."""
    rng = np.random.default_rng([spec.seed, 0])
    plans = []
    for p in range(spec.n_patients):
        n_studies = 2 if rng.random() < spec.second_study_fraction else 1
        positive = bool(rng.random() < spec.prevalence)
        for s in range(n_studies):
            # follow-up studies mostly keep the finding; some appear or resolve
            if s > 0 and rng.random() < 0.2:
                positive = not positive
            plans.append(_StudyPlan(p, s, positive))
    return plans


def _sample_nodules(
    spec: CohortSpec,
    anatomy: phantom.Anatomy,
    acq: phantom.Acquisition,
    rng: np.random.Generator,
) -> list[phantom.Nodule]:
    nodules: list[phantom.Nodule] = []
    n = int(rng.integers(1, spec.max_nodules + 1))
    mm_per_unit = phantom.mm_per_unit(acq)
    lo, hi = spec.nodule_diameter_mm
    for _attempt in range(10_000):
        if len(nodules) == n:
            break
        diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        radius = diameter / 2 / mm_per_unit
        u, v = rng.uniform(-0.75, 0.75), rng.uniform(-0.75, 0.55)
        # the whole nodule must sit in the lung field, clear of the other nodules
        probe_u = u + 0.8 * radius * np.array([0, 1, -1, 0, 0])
        probe_v = v + 0.8 * radius * np.array([0, 0, 0, 1, -1])
        if phantom.lung_mask(anatomy, probe_u, probe_v).min() < 0.9:
            continue
        if any(
            np.hypot(u - o.u, v - o.v) < radius + o.diameter_mm / 2 / mm_per_unit for o in nodules
        ):
            continue
        contrast = float(rng.uniform(*spec.nodule_contrast))
        nodules.append(phantom.Nodule(u, v, diameter, contrast))
    else:
        raise ValueError(
            f"cannot place {lo}-{hi} mm nodules in a lung field of "
            f"{acq.rows}x{acq.cols} px at {acq.pixel_spacing_mm} mm: the field of view is "
            "too small; raise synthesize.pixel_spacing_mm or the matrix size"
        )
    return nodules


def _sample_acquisition(spec: CohortSpec, rng: np.random.Generator) -> phantom.Acquisition:
    granulomas = []
    for _ in range(int(rng.integers(0, 4))):  # small calcified dots, in both classes
        granulomas.append((rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.4), rng.uniform(2.0, 4.5)))
    bits = int(rng.choice([12, 14]))
    max_value = 2**bits - 1
    return phantom.Acquisition(
        rows=int(rng.integers(spec.min_matrix_px, spec.max_matrix_px + 1)),
        cols=int(rng.integers(spec.min_matrix_px, spec.max_matrix_px + 1)),
        pixel_spacing_mm=round(float(rng.uniform(*spec.pixel_spacing_mm)), 4),
        shift_u=rng.uniform(-0.05, 0.05),
        shift_v=rng.uniform(-0.05, 0.05),
        rotation_deg=rng.uniform(-4, 4),
        zoom=rng.uniform(0.9, 1.05),
        scatter=rng.uniform(0.05, 0.15),
        heel=rng.uniform(-0.08, 0.08),
        noise=rng.uniform(0.04, 0.09),
        gain=max_value * rng.uniform(0.11, 0.16),
        offset=max_value * rng.uniform(0.45, 0.55),
        bits_stored=bits,
        granulomas=granulomas,
    )


def _image_dataset(spec, plan, identity, acq, pixels, rng) -> tuple[Dataset, str]:
    """A DX/CR dataset holding `pixels` (uint16, MONOCHROME2 sense) with a random but
    label-independent choice of photometric interpretation, rescale and syntax."""
    modality, manufacturer, model = _DEVICES[int(rng.integers(len(_DEVICES)))]
    fields = study_fields(rng, plan.study_index, station_prefix="XR")
    ds = Dataset()
    sop_class = DX_STORAGE if modality == "DX" else CR_STORAGE
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(spec.seed, "sop", plan.patient_index, plan.study_index)
    ds.StudyInstanceUID = uid(spec.seed, "study", plan.patient_index, plan.study_index)
    ds.SeriesInstanceUID = uid(spec.seed, "series", plan.patient_index, plan.study_index)
    ds.update(dataset_from(identity))
    ds.update(dataset_from(fields))
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.SeriesNumber = int(rng.integers(1, 5))
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = str(rng.choice(["PA", "AP"], p=[0.7, 0.3]))
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = float(rng.choice([110, 115, 120, 125]))
    ds.Exposure = int(rng.integers(1, 6))
    ds.ExposureTime = int(rng.integers(4, 20))
    spacing = [acq.pixel_spacing_mm, acq.pixel_spacing_mm]
    if modality == "DX":
        ds.ImagerPixelSpacing = spacing
        if rng.random() < 0.5:
            ds.PixelSpacing = spacing
    else:
        ds.PixelSpacing = spacing
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = acq.bits_stored
    ds.HighBit = acq.bits_stored - 1
    ds.PixelRepresentation = 0
    max_value = 2**acq.bits_stored - 1
    stored = pixels
    if rng.random() < 0.3:
        # MONOCHROME1: the detector stores bright as low values; readers must invert
        ds.PhotometricInterpretation = "MONOCHROME1"
        stored = (max_value - pixels.astype(np.int32)).astype(np.uint16)
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if rng.random() < 0.3:
        # a vendor-specific rescale to "real" units: real = stored * slope + intercept
        ds.RescaleSlope = float(rng.choice([0.5, 1.0, 2.0]))
        ds.RescaleIntercept = float(rng.choice([0.0, -1024.0, 100.0]))
        ds.RescaleType = "US"
    ds.WindowCenter = round(acq.offset)
    ds.WindowWidth = round(6 * acq.gain)
    ds.PixelData = stored.astype("<u2").tobytes()
    syntax = ImplicitVRLittleEndian if rng.random() < 0.2 else ExplicitVRLittleEndian
    return ds, syntax


def _synthesize_study(args: tuple[CohortSpec, _StudyPlan, str]) -> dict:
    spec, plan, dicom_dir = args
    anatomy = phantom.sample_anatomy(np.random.default_rng([spec.seed, plan.patient_index, 1]))
    rng = np.random.default_rng([spec.seed, plan.patient_index, plan.study_index, 2])
    acq = _sample_acquisition(spec, rng)
    # nodules of a patient persist across studies: draw them from the patient's stream
    nodule_rng = np.random.default_rng([spec.seed, plan.patient_index, 3])
    nodules = _sample_nodules(spec, anatomy, acq, nodule_rng) if plan.positive else []
    pixels, marks = phantom.render(anatomy, acq, nodules, rng)
    identity = patient_identity(spec.seed, plan.patient_index)
    header_rng = np.random.default_rng([spec.seed, plan.patient_index, plan.study_index, 4])
    ds, syntax = _image_dataset(spec, plan, identity, acq, pixels, header_rng)
    relpath = random_relpath(header_rng)
    write_dataset(ds, syntax, Path(dicom_dir) / relpath)
    return {
        "accession": str(ds.AccessionNumber),
        "positive": plan.positive,
        "lesions": [(round(r, 2), round(c, 2), round(d, 2)) for r, c, d in marks],
        "identity": identity,
        "study_uid": str(ds.StudyInstanceUID),
    }


def synthesize_cohort(
    dicom_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    lesions_path: str | os.PathLike,
    spec: CohortSpec,
    *,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Write the cohort (see module docstring) to the three given paths.

    Returns counts for the log.
    """
    dicom_dir = Path(dicom_dir)
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise FileExistsError(
            f"{dicom_dir} already holds files; radflow does not write a synthetic cohort "
            "into an existing DICOM tree. Point synthesize at an empty folder."
        )
    dicom_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(spec)
    jobs = [(spec, plan, str(dicom_dir)) for plan in plans]
    studies = map_jobs(_synthesize_study, jobs, workers=threads, chunksize=4, progress=progress)
    write_junk(spec.seed, dicom_dir, studies[0], spec.n_junk_files)
    by_accession = sorted(studies, key=lambda s: s["accession"])
    write_csv(
        labels_path,
        ["AccessionNumber", "finding"],
        [[s["accession"], POSITIVE if s["positive"] else NEGATIVE] for s in by_accession],
    )
    write_csv(
        lesions_path,
        ["AccessionNumber", "row_px", "col_px", "diameter_mm"],
        [[s["accession"], *lesion] for s in by_accession for lesion in s["lesions"]],
    )
    n_pos = sum(s["positive"] for s in studies)
    return {
        "patients": spec.n_patients,
        "studies": len(studies),
        "positive_studies": n_pos,
        "junk_files": spec.n_junk_files,
    }
