"""The segmentation demo's cohort: synthetic brain MR written as real DICOM, with lesion
ground truth as a user would have it.

`synthesize_brain_cohort(out_dir, n_patients, seed, workers=1, scale=1.0, ...)` writes

    out_dir/dicom/<study folders>/<series folder>/IM<hex>[.dcm]   one file per slice
    out_dir/labels/<StudyInstanceUID>.nii.gz  or  .dcm             ground truth per case
    out_dir/labels.csv                                             the labels table
    out_dir/lesions.csv                                            each lesion in world mm

**Images.** One MR study per patient with two series that together are one case with two
channels: a FLAIR and a T1-weighted post-contrast series (separate SeriesInstanceUIDs, one
StudyInstanceUID and FrameOfReferenceUID). MR Image Storage, one slice per file, random
file names (".dcm" or none) in random folders, slices in random order on disk, fake PHI
(PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName, referring
physician, operator, station, device serial number). Four fictitious scanners, each with
its own SeriesDescription style, stored type (uint16 12-bit, int16) and intensity scale;
two use RescaleSlope. InstanceNumber follows the slice normal (the T1-post's is sometimes
reversed), transfer syntax explicit or implicit VR little endian. The descriptions vary by scanner and orientation ("AX T2 FLAIR",
"t2_flair_tra", "FLAIR obl", "T2_FLAIR_SAG" / "AX T1+C", "t1_mprage_sag_ce", "T1 tra POST
GAD", "T1_3D_AX_GAD"), and every one is matched by exactly one of `FLAIR_PATTERN`
"(?i)flair" and `POST_CONTRAST_PATTERN` "(?i)(post|\\+c|gad|ce)": pick the channels with
those.

**Geometry.** The two series of a case do not share a grid: the FLAIR is a 2D acquisition
(slices 3-5 mm, sometimes with a gap) that is axial, oblique (axial tilted 5-20 degrees)
or sagittal; the T1-post is 3D (axial or sagittal, slices 1.2-1.8 mm) or 2D. In-plane
spacing is 0.9-1.2 mm and matrices 180-270 at `scale=1`; `scale` multiplies the in-plane
spacing and the 3D slice spacing (2: about a quarter of the voxels), 2D slice thickness
stays 3-5 mm. Field of view: about 180-240 x 220-240 mm in-plane, 150-170 mm across
slices (155-175 mm for sagittal stacks). Channels must be resampled onto one grid
downstream.

**Contents** (`brain_phantom`): one continuous head in world coordinates per patient,
sampled by each series with partial volume across the slice, a smooth multiplicative
bias field and Rician noise: scalp, skull, CSF, folded cortex, white matter, ventricles,
thalami, and 0-3 irregular lesions 5-40 mm across (no lesion in about a third of the
patients), each of oedema (bright on FLAIR), an enhancing rim (bright on T1-post) and,
in most lesions over 12 mm, a necrotic core (dark on T1-post).

**Ground truth** (`brain_truth`). A label map on the FLAIR (the reference series) with
the BraTS 2013-2015 values: 0 background, 1 necrosis (the non-enhancing core), 2 oedema,
4 enhancing rim; 3 (non-enhancing tumour) is not used. Each voxel holds the zone that fills
most of it; a lesion smaller than the voxels is marked on the one it fills most. Per case,
in a share `seg_fraction` of the cases at seeded random (both forms occur whenever
n_patients >= 2), it is delivered as either
- "nifti": a .nii.gz label map (uint8) on exactly the grid dcm2niix gives the FLAIR series
  (same voxel order, same affine: RAS, i.e. DICOM LPS with x and y negated; rows flipped
  as dcm2niix flips them), or
- "seg": a DICOM Segmentation (highdicom, BINARY, one segment per zone: "necrosis",
  "oedema", "enhancing", numbered 1, 2, 3) whose frames reference the FLAIR's SOP
  instances.
Negative cases get an empty label map in the same form.

**Tables.** `labels.csv`, one row per case: StudyInstanceUID (the key: annotation tools
and research PACS exports identify a case by its study UID; the SEG carries the same
UID), label_path (relative to the table), label_form ("nifti" | "seg"), lesion (1 when the
label map has any lesion voxel, i.e. the patient has a lesion, else 0: the study-level
binary label for stratification).
`lesions.csv`, one row per lesion drawn: StudyInstanceUID, lesion_index, centre_x_mm,
centre_y_mm, centre_z_mm (centre of mass in DICOM patient coordinates, LPS), diameter_mm
(nominal), volume_ml (in the continuous phantom), label_voxels (its voxels in the label
map).

**Determinism and label safety.** Everything is a function of the seed: the same seed
writes byte-identical files whatever the number of worker processes. Each patient draws
from separate random streams: anatomy, lesions, header (scanner, descriptions, geometry,
storage, timings, file names, transfer syntax), acquisition (bias, noise level), noise,
and the ground-truth form. Nothing written in the DICOM tree except pixel values depends
on the lesion stream, so headers, file names, file sizes, numbers of slices and scanners
carry no information about the label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radflow.synth import brain_phantom
from radflow.synth.brain_phantom import SliceGeometry, rotation_matrix
from radflow.synth.brain_truth import write_label_nifti, write_label_seg
from radflow.synth.export import (
    dataset_from,
    decimal_string,
    later_time,
    map_jobs,
    patient_age,
    patient_identity,
    random_file_name,
    random_folder,
    require_empty,
    study_fields,
    uid,
    write_csv,
    write_junk,
    write_series,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: Regular expressions on SeriesDescription that pick the two channels.
FLAIR_PATTERN = r"(?i)flair"
POST_CONTRAST_PATTERN = r"(?i)(post|\+c|gad|ce)"

LABELS_TABLE = "labels.csv"
LESIONS_TABLE = "lesions.csv"
LABEL_COLUMNS = ["StudyInstanceUID", "label_path", "label_form", "lesion"]
LESION_COLUMNS = [
    "StudyInstanceUID", "lesion_index", "centre_x_mm", "centre_y_mm", "centre_z_mm",
    "diameter_mm", "volume_ml", "label_voxels",
]  # fmt: skip


@dataclass(frozen=True)
class BrainCohortSpec:
    """What to synthesise. `lesion_count_p`: probabilities of 0, 1, 2, 3 lesions;
    `lesion_diameter_mm`: range of nominal diameters (log-uniform; at a coarse `scale`
    small lesions are a voxel or two in the labels);
    `seg_fraction`: share of cases whose ground truth is a DICOM SEG (the rest NIfTI);
    `n_junk_files`: 0-3 non-image objects (a structured report, a text file, a truncated
    slice) as in the radiograph demo's export."""

    n_patients: int = 50
    seed: int = 20261203
    scale: float = 1.0
    lesion_count_p: tuple[float, float, float, float] = (0.35, 0.35, 0.2, 0.1)
    lesion_diameter_mm: tuple[float, float] = (5.0, 40.0)
    seg_fraction: float = 0.5
    n_junk_files: int = 0


@dataclass(frozen=True)
class _Scanner:
    manufacturer: str
    model: str
    field_strength_t: float
    software: str
    orientation_words: tuple[str, str, str]  # axial, oblique, sagittal
    flair: str  # SeriesDescription templates, "{o}" = orientation word
    t1post_2d: str
    t1post_3d: str
    signal_units: tuple[float, float]  # real value of relative signal 1
    pixel_representation: int
    bits_stored: int
    rescale_slopes: tuple[float, ...] = ()  # empty: stored value = real value


_SCANNERS = (
    _Scanner("Acme Medical", "Magnitude 3T", 3.0, "MX26.1", ("AX", "OBL", "SAG"),
             "{o} T2 FLAIR", "{o} T1+C", "{o} 3D T1+C", (700, 1100), 1, 16),
    _Scanner("Borealis Imaging", "Aurora 1.5T", 1.5, "syngo B17", ("tra", "tra_obl", "sag"),
             "t2_flair_{o}", "t1_se_{o}_post", "t1_mprage_{o}_ce", (1000, 1600), 0, 12),
    _Scanner("Cygnus Systems", "Helix 3.0", 3.0, "5.6.1", ("tra", "obl", "sag"),
             "FLAIR {o}", "T1 {o} POST GAD", "T1W 3D {o} post", (2000, 3000), 0, 12,
             (1.5, 2.0, 2.4425)),
    _Scanner("Delphi Medical", "Orion 1.5T", 1.5, "V4.2", ("AX", "OBL", "SAG"),
             "T2_FLAIR_{o}", "T1_{o}_POST", "T1_3D_{o}_GAD", (1500, 2500), 1, 16,
             (0.25, 0.5)),
)  # fmt: skip
_ORIENTATIONS = ("axial", "oblique", "sagittal")
# decimals written (a DS holds 16 characters): enough that the geometry a reader rebuilds
# from the header agrees with the one sampled to well under 1e-4 mm
_COSINE_DECIMALS = 8
_POSITION_DECIMALS = 5
_BASE_COSINES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
_STUDY_DESCRIPTIONS = ("MRI BRAIN W/WO CONTRAST", "MR Schaedel nativ+KM", "BRAIN TUMOUR PROTOCOL")
_AGENTS = ("Gadobutrol", "Gadoterate meglumine", "Gadobenate dimeglumine")
#: (contrast, acquisition) -> fixed fields, {keyword: (low, high, decimals)}, echo train
#: length range: a turbo inversion-recovery FLAIR, an MPRAGE-like 3D and a spin-echo 2D T1
_SEQUENCES = {
    ("flair", "2D"): (
        {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"]},
        {"RepetitionTime": (8000, 11000, 0), "EchoTime": (85, 140, 1),
         "InversionTime": (2200, 2800, 0), "FlipAngle": (90, 160, 0)},
        (16, 33),
    ),
    ("t1post", "3D"): (
        {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"]},
        {"RepetitionTime": (1800, 2300, 0), "EchoTime": (2, 4, 2),
         "InversionTime": (850, 1100, 0), "FlipAngle": (8, 12, 0)},
        (1, 2),
    ),
    ("t1post", "2D"): (
        {"ScanningSequence": ["SE"], "SequenceVariant": ["SK", "SP"]},
        {"RepetitionTime": (400, 700, 0), "EchoTime": (8, 15, 1), "FlipAngle": (70, 90, 0)},
        (1, 5),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class SeriesPlan:
    """Everything about one series that is drawn from the header stream."""

    contrast: str  # "flair" | "t1post"
    description: str
    orientation: str  # axial | oblique | sagittal
    acquisition: str  # "2D" | "3D"
    geometry: SliceGeometry
    series_number: int
    series_time: str
    syntax: str
    folder: Path
    file_names: tuple[str, ...]  # of slice k = 0, 1, ...
    instance_numbers: tuple[int, ...]
    sequence: dict  # sequence-specific header fields
    units: float  # real value of relative signal 1
    rescale_slope: float | None
    window: tuple[float, float]


@dataclass
class CasePlan:
    """A patient's study as the header stream draws it, and the case's label form."""

    patient_index: int
    identity: dict
    study: dict
    scanner: _Scanner
    series: list[SeriesPlan]  # FLAIR first
    study_uid: str
    frame_uid: str
    label_form: str


@dataclass
class Case:
    """A rendered case: its plan, stored pixel arrays (slices, rows, columns) per series,
    the FLAIR label map in the same layout, and its lesions (drawn, rasterised, and how
    many label voxels each has)."""

    plan: CasePlan
    pixels: list[np.ndarray]
    label: np.ndarray
    lesions: list[brain_phantom.Lesion]
    crops: list[brain_phantom.LesionCrop]
    label_voxels: list[int]  # of each lesion in `label`


# -------------------------------------------------------------------- random streams
def _stream(spec: BrainCohortSpec, patient_index: int, name: str) -> np.random.Generator:
    streams = ("anatomy", "lesions", "header", "acquisition", "noise")
    return np.random.default_rng([spec.seed, patient_index, 100 + streams.index(name)])


def label_forms(spec: BrainCohortSpec) -> list[str]:
    """The ground-truth form of each case: round(seg_fraction * n) "seg" cases at
    seeded random positions (so both forms occur), "nifti" for the rest."""
    n_seg = int(round(spec.seg_fraction * spec.n_patients))
    if spec.n_patients >= 2:
        n_seg = min(max(n_seg, 1), spec.n_patients - 1)
    chosen = set(np.random.default_rng([spec.seed, 6]).permutation(spec.n_patients)[:n_seg])
    return ["seg" if p in chosen else "nifti" for p in range(spec.n_patients)]


# ---------------------------------------------------------------------- header draws
def _draw_geometry(
    rng: np.random.Generator, contrast: str, head_centre, scale: float
) -> tuple[str, str, SliceGeometry]:
    if contrast == "flair":
        acquisition = "2D"
        orientation = str(rng.choice(_ORIENTATIONS, p=[0.6, 0.25, 0.15]))
    else:
        acquisition = "3D" if rng.random() < 0.55 else "2D"
        p = [0.6, 0.0, 0.4] if acquisition == "3D" else [0.6, 0.3, 0.1]
        orientation = str(rng.choice(_ORIENTATIONS, p=p))
    pixel = round(rng.uniform(0.9, 1.2) * scale, 4)
    if acquisition == "2D":
        thickness = round(rng.uniform(3, 5) * 2) / 2
        step = round(thickness * float(rng.choice([1.0, 1.0, 1.1, 1.2])), 3)
    else:
        thickness = step = round(rng.uniform(1.2, 1.8) * scale, 3)
    if orientation == "sagittal":
        fov_rows, fov_cols = rng.uniform(220, 240), rng.uniform(220, 240)
        coverage = rng.uniform(155, 175)  # left-right: the whole head
    else:
        fov_rows = rng.uniform(220, 240)
        fov_cols = fov_rows * rng.uniform(0.8, 1.0)
        coverage = rng.uniform(150, 170)
    rows, cols = int(round(fov_rows / pixel)), int(round(fov_cols / pixel))
    n_slices = int(round(coverage / step))
    row, col = (
        np.array(v) for v in _BASE_COSINES["sagittal" if orientation == "sagittal" else "axial"]
    )
    if orientation == "oblique":
        azimuth = np.deg2rad(rng.uniform(-30, 30))
        tilt = np.deg2rad(rng.uniform(5, 20) * rng.choice([-1, 1]))
        turn = rotation_matrix(np.array([np.cos(azimuth), np.sin(azimuth), 0.0]), tilt)
        row, col = turn @ row, turn @ col
    row, col = np.round(row, _COSINE_DECIMALS) + 0.0, np.round(col, _COSINE_DECIMALS) + 0.0
    normal = np.cross(row, col)
    centre = np.asarray(head_centre) + [rng.normal(0, 3), rng.normal(0, 4), rng.uniform(5, 15)]
    origin = centre - (
        (cols - 1) / 2 * pixel * row
        + (rows - 1) / 2 * pixel * col
        + (n_slices - 1) / 2 * step * normal
    )
    geometry = SliceGeometry(
        row_cosine=tuple(row),
        col_cosine=tuple(col),
        row_spacing_mm=pixel,
        col_spacing_mm=pixel,
        slice_step_mm=step,
        thickness_mm=thickness,
        shape=(n_slices, rows, cols),
        origin_lps=tuple(np.round(origin, _POSITION_DECIMALS)),
    )
    return orientation, acquisition, geometry


def _draw_sequence(rng: np.random.Generator, contrast: str, acquisition: str, scanner) -> dict:
    fixed, ranges, echo_train = _SEQUENCES[contrast, acquisition]
    fields = {
        "MagneticFieldStrength": decimal_string(scanner.field_strength_t, 1),
        "ImagingFrequency": decimal_string(42.577478 * scanner.field_strength_t, 6),
        "ImagedNucleus": "1H",
        "MRAcquisitionType": acquisition,
        "NumberOfAverages": "1",
        **fixed,
        "EchoTrainLength": int(rng.integers(*echo_train)),
    }
    for keyword, (low, high, decimals) in ranges.items():
        fields[keyword] = decimal_string(rng.uniform(low, high), decimals)
    if contrast == "t1post":
        fields.update(ContrastBolusAgent=str(rng.choice(_AGENTS)), ContrastBolusRoute="IV")
    return fields


def plan_case(
    spec: BrainCohortSpec, patient_index: int, label_form: str, head: brain_phantom.Head
) -> CasePlan:
    """The header stream of one patient: scanner, study fields, both series' geometry,
    descriptions, storage, timings and file layout. The head's position (anatomy stream)
    places the field of view; nothing here depends on lesions."""
    rng = _stream(spec, patient_index, "header")
    scanner = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
    study = study_fields(rng, 0, station_prefix="MR")
    study["StudyDescription"] = str(rng.choice(_STUDY_DESCRIPTIONS))
    study_folder = random_folder(rng)
    series = []
    for n, contrast in enumerate(("flair", "t1post")):
        orientation, acquisition, geometry = _draw_geometry(
            rng, contrast, head.centre_lps, spec.scale
        )
        word = scanner.orientation_words[_ORIENTATIONS.index(orientation)]
        template = {
            "flair": scanner.flair,
            "t1post": scanner.t1post_3d if acquisition == "3D" else scanner.t1post_2d,
        }[contrast]
        n_slices = geometry.shape[0]
        instance_numbers = np.arange(1, n_slices + 1)
        # the T1-post is sometimes numbered from the other end of the stack; the FLAIR is
        # not: dcm2niix then computes the origin from the last slice in single precision,
        # up to 3e-4 mm off, and the label map is to match the converted FLAIR to 1e-4 mm
        if contrast == "t1post" and rng.random() < 0.3:
            instance_numbers = instance_numbers[::-1]
        units = rng.uniform(*scanner.signal_units)
        slope = float(rng.choice(scanner.rescale_slopes)) if scanner.rescale_slopes else None
        series.append(
            SeriesPlan(
                contrast=contrast,
                description=template.format(o=word),
                orientation=orientation,
                acquisition=acquisition,
                geometry=geometry,
                series_number=int(rng.integers(2, 6)) + 6 * n,
                series_time=later_time(study["StudyTime"], 4 + 12 * n + rng.uniform(0, 6)),
                syntax=ImplicitVRLittleEndian if rng.random() < 0.2 else ExplicitVRLittleEndian,
                folder=study_folder / f"{rng.integers(16**4):04X}",
                file_names=tuple(random_file_name(rng) for _ in range(n_slices)),
                instance_numbers=tuple(int(i) for i in instance_numbers),
                sequence=_draw_sequence(rng, contrast, acquisition, scanner),
                units=units,
                rescale_slope=slope,
                window=(units * rng.uniform(0.45, 0.6), units * rng.uniform(0.9, 1.2)),
            )
        )
    return CasePlan(
        patient_index=patient_index,
        identity=patient_identity(spec.seed, patient_index),
        study=study,
        scanner=scanner,
        series=series,
        study_uid=uid(spec.seed, "study", patient_index),
        frame_uid=uid(spec.seed, "frame", patient_index),
        label_form=label_form,
    )


# -------------------------------------------------------------------------- rendering
def phantom_spacing_mm(scale: float) -> float:
    """Grid spacing of the rasterised head: a little coarser than the finest voxels."""
    return 1.25 * scale


def _store(real: np.ndarray, plan: SeriesPlan, scanner: _Scanner) -> np.ndarray:
    """Real values -> stored integers (rescale applied backwards, clipped to the type)."""
    stored = real if plan.rescale_slope is None else real / plan.rescale_slope
    if scanner.pixel_representation:
        top, dtype = 2 ** (scanner.bits_stored - 1) - 1, np.int16
    else:
        top, dtype = 2**scanner.bits_stored - 1, np.uint16
    return np.clip(np.rint(stored), 0, top).astype(dtype)


def render_case(spec: BrainCohortSpec, patient_index: int, label_form: str = "nifti") -> Case:
    """Draw and render one patient (no files written)."""
    head = brain_phantom.sample_head(_stream(spec, patient_index, "anatomy"))
    plan = plan_case(spec, patient_index, label_form, head)
    lesion_rng = _stream(spec, patient_index, "lesions")
    n_lesions = int(lesion_rng.choice(len(spec.lesion_count_p), p=spec.lesion_count_p))
    lesions = brain_phantom.sample_lesions(lesion_rng, head, n_lesions, spec.lesion_diameter_mm)
    phantom = brain_phantom.build_phantom(head, lesions, phantom_spacing_mm(spec.scale))
    acquisition = _stream(spec, patient_index, "acquisition")
    noise = _stream(spec, patient_index, "noise")
    pixels = []
    for series in plan.series:
        bias = brain_phantom.bias_field(
            series.geometry, head.centre_lps, acquisition.normal(0, 0.08, 9)
        )
        sigma = acquisition.uniform(0.015, 0.035)
        magnitude = brain_phantom.sample_series(
            phantom, series.contrast, series.geometry, bias, sigma, noise
        )
        pixels.append(_store(magnitude * series.units, series, plan.scanner))
    label, owner = brain_phantom.sample_labels(phantom, plan.series[0].geometry)
    label_voxels = np.bincount(owner[owner >= 0], minlength=len(lesions))
    return Case(plan, pixels, label, lesions, phantom.lesions, [int(n) for n in label_voxels])


# ---------------------------------------------------------------------------- writing
def _slice_datasets(case: Case, series_index: int, spec: BrainCohortSpec) -> list[Dataset]:
    """The DICOM datasets of one series, slice k = 0, 1, ... (file meta not yet set)."""
    plan, series = case.plan, case.plan.series[series_index]
    scanner, geometry = plan.scanner, series.geometry
    series_uid = uid(spec.seed, "series", plan.patient_index, series.contrast)
    study_date = plan.study["StudyDate"]
    common = {
        **plan.identity,
        **plan.study,
        "SeriesTime": series.series_time,
        "ContentTime": series.series_time,
        "AcquisitionDate": study_date,
        "AcquisitionTime": series.series_time,
        "PatientAge": patient_age(plan.identity["PatientBirthDate"], study_date),
        "SOPClassUID": MR_IMAGE_STORAGE,
        "StudyInstanceUID": plan.study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": plan.frame_uid,
        "PositionReferenceIndicator": "",
        "Modality": "MR",
        "Manufacturer": scanner.manufacturer,
        "ManufacturerModelName": scanner.model,
        "SoftwareVersions": scanner.software,
        "SeriesDescription": series.description,
        "ProtocolName": series.description,
        "SeriesNumber": series.series_number,
        "AcquisitionNumber": 1,
        "BodyPartExamined": "BRAIN",
        "PatientPosition": "HFS",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        **series.sequence,
        "SliceThickness": decimal_string(geometry.thickness_mm, 3),
        "SpacingBetweenSlices": decimal_string(geometry.slice_step_mm, 3),
        "PixelSpacing": [
            decimal_string(geometry.row_spacing_mm),
            decimal_string(geometry.col_spacing_mm),
        ],
        "ImageOrientationPatient": [
            decimal_string(v, _COSINE_DECIMALS)
            for v in (*geometry.row_cosine, *geometry.col_cosine)
        ],
        "Rows": geometry.shape[1],
        "Columns": geometry.shape[2],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": scanner.bits_stored,
        "HighBit": scanner.bits_stored - 1,
        "PixelRepresentation": scanner.pixel_representation,
        "WindowCenter": decimal_string(series.window[0], 0),
        "WindowWidth": decimal_string(series.window[1], 0),
    }
    if series.rescale_slope is not None:
        common.update(
            RescaleSlope=decimal_string(series.rescale_slope),
            RescaleIntercept="0",
            RescaleType="US",
        )
    normal = geometry.normal
    template = dataset_from(common)  # built (and its values checked) once per series
    datasets = []
    for k, position in enumerate(geometry.positions_lps()):
        ds = Dataset()
        ds.update(template)
        ds.SOPInstanceUID = uid(spec.seed, "sop", plan.patient_index, series.contrast, k)
        ds.InstanceNumber = series.instance_numbers[k]
        ds.ImagePositionPatient = [decimal_string(v, _POSITION_DECIMALS) for v in position]
        ds.SliceLocation = decimal_string(float(position @ normal))
        ds.PixelData = (
            case.pixels[series_index][k]
            .astype("<i2" if scanner.pixel_representation else "<u2")
            .tobytes()
        )
        datasets.append(ds)
    return datasets


def _write_case(args: tuple[BrainCohortSpec, int, str, str]) -> dict:
    spec, patient_index, label_form, out_dir = args
    out = Path(out_dir)
    case = render_case(spec, patient_index, label_form)
    plan = case.plan
    flair = []
    for index, series in enumerate(plan.series):
        datasets = _slice_datasets(case, index, spec)
        paths = [out / "dicom" / series.folder / name for name in series.file_names]
        write_series(datasets, series.syntax, paths)
        if index == 0:
            flair = datasets
    suffix = ".nii.gz" if label_form == "nifti" else ".dcm"
    label_path = Path("labels") / f"{plan.study_uid}{suffix}"
    if label_form == "nifti":
        write_label_nifti(out / label_path, case.label, plan.series[0].geometry)
    else:
        write_label_seg(
            out / label_path,
            case.label,
            flair,
            series_uid=uid(spec.seed, "seg-series", patient_index),
            sop_uid=uid(spec.seed, "seg", patient_index),
            dimension_uid=uid(spec.seed, "seg-dimensions", patient_index),
            date=plan.study["StudyDate"],
            time=later_time(plan.study["StudyTime"], 90),  # read after the examination
        )
    return {
        "study_uid": plan.study_uid,
        "accession": plan.study["AccessionNumber"],
        "identity": plan.identity,
        "label_path": label_path.as_posix(),
        "label_form": label_form,
        "lesion": int(case.label.any()),
        "lesions": [
            [
                *np.round(crop.centroid_lps, 2),
                round(lesion.diameter_mm, 1),
                round(crop.volume_ml, 3),
                voxels,
            ]
            for lesion, crop, voxels in zip(
                case.lesions, case.crops, case.label_voxels, strict=True
            )
        ],  # fmt: skip
    }


def synthesize_brain_cohort(
    out_dir: str | os.PathLike,
    n_patients: int = 50,
    seed: int = BrainCohortSpec.seed,
    *,
    workers: int = 1,
    scale: float = 1.0,
    progress: bool = False,
    **options,
) -> dict[str, Path]:
    """Write the cohort (module docstring) under `out_dir`, which must be empty or absent.
    `options`: the other `BrainCohortSpec` fields. Returns the paths written: "dicom"
    (folder), "labels_dir" (folder), "labels" and "lesions" (tables)."""
    out = require_empty(out_dir)
    spec = BrainCohortSpec(n_patients=n_patients, seed=seed, scale=scale, **options)
    jobs = [(spec, p, form, str(out)) for p, form in enumerate(label_forms(spec))]
    cases = map_jobs(_write_case, jobs, workers=workers, progress=progress, unit="patient")
    paths = {
        "dicom": out / "dicom",
        "labels_dir": out / "labels",
        "labels": out / LABELS_TABLE,
        "lesions": out / LESIONS_TABLE,
    }
    write_junk(spec.seed, paths["dicom"], cases[0], spec.n_junk_files, min_victim_bytes=10_000)
    by_key = sorted(cases, key=lambda c: c["study_uid"])
    write_csv(
        paths["labels"],
        LABEL_COLUMNS,
        [[c["study_uid"], c["label_path"], c["label_form"], c["lesion"]] for c in by_key],
    )
    write_csv(
        paths["lesions"],
        LESION_COLUMNS,
        [[c["study_uid"], n, *lesion] for c in by_key for n, lesion in enumerate(c["lesions"])],
    )
    return paths
