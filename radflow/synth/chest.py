"""The lung-nodule demo's cohort: synthetic chest CT written as real DICOM, with nodule
annotations in the LUNA16 form.

`synthesize_chest_cohort(root, n_patients, seed, workers=1, scale=1.0, ...)` writes

    root/dicom/<folders>/<series folder>/IM<hex>[.dcm]   one CT series per patient
    root/annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm (nodules)
    root/annotations_excluded.csv   the same, findings that are neither hit nor miss
    root/seriesuids.csv             seriesuid,has_nodule (the labels table)

**Coordinates.** coordX, coordY, coordZ are the nodule's centre in world mm in the DICOM
patient frame (LPS: +x patient left, +y posterior, +z head), the frame of
ImagePositionPatient, and of SimpleITK's physical points (as in LUNA16), whatever the
patient position or the series orientation. seriesuid is the SeriesInstanceUID.

**Images.** CT Image Storage, one slice per file, random file names (".dcm" or none) in
random folders, fake PHI (names, ids, birth dates, accession, institution, staff,
station), Modality CT, BodyPartExamined CHEST. Values are HU stored as
HU + 1024 (RescaleIntercept -1024, RescaleSlope 1) in uint16 (12 bits) or int16; one
scanner pads outside the reconstruction circle with -2000 (PixelPaddingValue, HU -3024).
Four fictitious scanners, each with its own descriptions, kernels (blur and noise
10-25 HU, correlated in-plane), and feet-first convention. Transfer syntax explicit or
implicit VR little endian.

**Geometry.** Slice thickness 0.625-2.5 mm (sometimes reconstructed with overlap),
pixel spacing 0.6-0.9 mm, both times `scale` (the CPU-size knob: 2.5 writes about
1/16 of the voxels); the matrix is 512/scale and the field of view (307-400 mm) covers
the body. Patients lie head first (HFS) or feet first (FFS) supine; a feet-first series
is written as a real scanner writes it: the positions stay in the patient's LPS frame
(+z towards the head), and two of the scanners keep the gantry view (row direction
patient right, ImageOrientationPatient -1,0,0,0,1,0, so the slice normal points to the
feet). InstanceNumber 1 is the first slice acquired (mostly the top, craniocaudal). Some
series are oblique (tilted 3-10 degrees) and some patients lie far from the scanner's
origin. Every setup (head first, feet first, oblique) occurs whenever n_patients >= 3.

**Axial extent.** A whole chest at 0.625 mm is 400-500 slices; `slab_mm` (e.g. 120-200)
images only that much of the thorax around the lungs' mid-height, as LIDC-style test
slabs do; None covers the lungs from apex to base with 10 mm to spare.

**Contents** (`chest_phantom`). 0 to `max_nodules` nodules (none in about a third of
the scans) of 3-30 mm (`nodule_diameter_mm`; skewed to small ones, about 60% >= 6 mm):
solid, part-solid and juxtapleural, inside the lungs and the imaged volume. Excluded
findings (annotations_excluded.csv): nodules under 3 mm (their diameter) and calcified
granulomas (diameter -1), in any scan.

**Determinism and label safety.** Everything is a function of the seed; the same seed
writes byte-identical files whatever the number of worker processes. Each patient draws
from separate streams: anatomy, nodules, header (scanner, geometry, descriptions, file
layout), noise. Nothing in the DICOM headers, file names or sizes depends on the nodule
stream, so no header field predicts has_nodule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy import ndimage

from radflow.synth import chest_phantom
from radflow.synth.brain_phantom import SliceGeometry, rotation_matrix, sample_volume
from radflow.synth.export import (
    dataset_from,
    decimal_string,
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

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
SERIES_COLUMNS = ["seriesuid", "has_nodule"]
RESCALE_INTERCEPT = -1024
_COSINE_DECIMALS, _POSITION_DECIMALS = 8, 5
_THICKNESSES_MM = (0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
_SETUPS = ("HFS", "FFS", "oblique", "HFS", "HFS", "FFS", "HFS", "oblique", "HFS", "HFS")
_STUDY_DESCRIPTIONS = ("CT CHEST WO CONTRAST", "CT Thorax nativ", "LOW DOSE CT LUNG SCREENING",
                       "CT CHEST HIGH RESOLUTION")  # fmt: skip


@dataclass(frozen=True)
class ChestCohortSpec:
    """What to synthesise (module docstring). `nodule_diameter_mm`: range of nodule
    diameters (those under 3 mm are excluded findings); `slab_mm`: axial extent imaged
    (None: the whole lungs); `n_junk_files`: 0-3 non-image objects as in export."""

    n_patients: int = 40
    seed: int = 20261210
    scale: float = 1.0
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0)
    max_nodules: int = 4
    n_junk_files: int = 2
    slab_mm: float | None = None


@dataclass(frozen=True)
class _Scanner:
    manufacturer: str
    model: str
    software: str
    description: str  # "{t}" slice thickness, "{k}" kernel
    kernels: tuple[tuple[str, float, float], ...]  # name, blur sigma mm, noise factor
    noise_hu: tuple[float, float]
    pixel_representation: int
    bits_stored: int
    padding: int | None  # stored value outside the reconstruction circle
    ffs_gantry_view: bool  # feet first: rows run to the patient's right


_SCANNERS = (
    _Scanner("Acme Medical", "Lumen 64", "LM4.2", "CHEST {t} {k}",
             (("STANDARD", 0.7, 1.0), ("LUNG", 0.45, 1.4)), (10, 18), 1, 16, -2000, True),
    _Scanner("Borealis Imaging", "Aurora CT Edge", "syngo CT VB20", "Thorax {t} {k}",
             (("B31f", 0.65, 1.0), ("B70f", 0.4, 1.5)), (12, 20), 0, 12, None, False),
    _Scanner("Cygnus Systems", "Helix 128", "4.1.2", "AX LUNG {t}mm {k}",
             (("C", 0.7, 1.0), ("L", 0.45, 1.3)), (14, 22), 0, 12, None, True),
    _Scanner("Delphi Medical", "Orion 16", "V3.5", "LDCT_CHEST_{t}_{k}",
             (("FC13", 0.6, 1.1), ("FC52", 0.4, 1.4)), (15, 25), 1, 16, None, False),
)  # fmt: skip


@dataclass(frozen=True)
class SeriesPlan:
    """The patient's one series as the header stream draws it."""

    scanner: _Scanner
    setup: str  # HFS | FFS | oblique
    position: str  # PatientPosition
    geometry: SliceGeometry
    kernel: tuple[str, float, float]
    noise_hu: float
    description: str
    study: dict
    syntax: str
    folder: Path
    file_names: tuple[str, ...]
    instance_numbers: tuple[int, ...]
    exposure: dict


def _stream(spec: ChestCohortSpec, patient_index: int, name: str) -> np.random.Generator:
    streams = ("anatomy", "nodules", "header", "noise")
    return np.random.default_rng([spec.seed, patient_index, 200 + streams.index(name)])


def acquisition_setups(spec: ChestCohortSpec) -> list[str]:
    """Each patient's setup (head first, feet first, oblique), a seeded permutation of
    `_SETUPS` repeated: every setup occurs whenever n_patients >= 3."""
    setups = [_SETUPS[i % len(_SETUPS)] for i in range(spec.n_patients)]
    return [setups[i] for i in np.random.default_rng([spec.seed, 8]).permutation(len(setups))]


def phantom_spacing_mm(scale: float) -> float:
    """Grid spacing of the rasterised thorax: about the finest voxels."""
    return 0.8 * scale


# ------------------------------------------------------------------------ header draws
def _draw_geometry(rng, th: chest_phantom.Thorax, setup: str, position: str, scanner, spec):
    matrix = int(round(512 / spec.scale))
    fov = rng.uniform(max(307.0, 2 * th.body_mm[0] + 30), 400.0)
    pixel = round(fov / matrix, 4)
    thickness = float(rng.choice(_THICKNESSES_MM)) * spec.scale
    step = thickness * (0.8 if rng.random() < 0.2 else 1.0)
    coverage = spec.slab_mm if spec.slab_mm else th.lung_height_mm + 20
    n_slices = int(round(coverage / step))
    row = np.array([-1.0 if position == "FFS" and scanner.ffs_gantry_view else 1.0, 0, 0])
    col = np.array([0.0, 1.0, 0.0])
    if setup == "oblique":
        azimuth = rng.uniform(0, 2 * np.pi)
        turn = rotation_matrix(np.array([np.cos(azimuth), np.sin(azimuth), 0.0]),
                               np.deg2rad(rng.uniform(3, 10)))  # fmt: skip
        row, col = turn @ row, turn @ col
    row, col = np.round(row, _COSINE_DECIMALS) + 0.0, np.round(col, _COSINE_DECIMALS) + 0.0
    normal = np.cross(row, col)
    centre = np.asarray(th.centre_lps) + [rng.normal(0, 5), rng.normal(0, 8), rng.normal(0, 5)]
    origin = centre - (matrix - 1) / 2 * pixel * (row + col) - (n_slices - 1) / 2 * step * normal
    return SliceGeometry(
        row_cosine=tuple(row), col_cosine=tuple(col), row_spacing_mm=pixel,
        col_spacing_mm=pixel, slice_step_mm=round(step, 4), thickness_mm=round(thickness, 4),
        shape=(n_slices, matrix, matrix), origin_lps=tuple(np.round(origin, _POSITION_DECIMALS)),
    )  # fmt: skip


def plan_series(spec: ChestCohortSpec, patient_index: int, setup: str, th) -> SeriesPlan:
    """The header stream of one patient; the thorax (anatomy stream) places the field of
    view, nothing here depends on nodules."""
    rng = _stream(spec, patient_index, "header")
    scanner = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
    position = setup if setup != "oblique" else str(rng.choice(["HFS", "FFS"]))
    geometry = _draw_geometry(rng, th, setup, position, scanner, spec)
    kernel = scanner.kernels[int(rng.integers(len(scanner.kernels)))]
    study = study_fields(rng, 0, station_prefix="CT")
    study["StudyDescription"] = str(rng.choice(_STUDY_DESCRIPTIONS))
    n_slices = geometry.shape[0]
    # InstanceNumber 1 is acquired first: the top of the chest, unless caudocranial
    top_first = np.argsort(-geometry.positions_lps()[:, 2], kind="stable")
    order = top_first if rng.random() < 0.85 else top_first[::-1]
    instance_numbers = np.empty(n_slices, int)
    instance_numbers[order] = np.arange(1, n_slices + 1)
    thickness = decimal_string(geometry.thickness_mm / spec.scale, 3)
    return SeriesPlan(
        scanner=scanner,
        setup=setup,
        position=position,
        geometry=geometry,
        kernel=kernel,
        noise_hu=rng.uniform(*scanner.noise_hu) * kernel[2],
        description=scanner.description.format(t=thickness, k=kernel[0]),
        study=study,
        syntax=ImplicitVRLittleEndian if rng.random() < 0.2 else ExplicitVRLittleEndian,
        folder=random_folder(rng) / f"{rng.integers(16**4):04X}",
        file_names=tuple(random_file_name(rng) for _ in range(n_slices)),
        instance_numbers=tuple(int(i) for i in instance_numbers),
        exposure={
            "KVP": str(int(rng.choice([100, 120, 120, 140]))),
            "XRayTubeCurrent": int(rng.integers(40, 350)),
            "ExposureTime": int(rng.integers(500, 1000)),
        },  # fmt: skip
    )


# -------------------------------------------------------------------------- rendering
def _in_view(geometry: SliceGeometry):
    to_index = np.linalg.inv(geometry.index_to_lps())
    spacing = np.array([geometry.slice_step_mm, geometry.row_spacing_mm, geometry.col_spacing_mm])

    def inside(point_lps, margin_mm: float) -> bool:
        index = to_index[:3, :3] @ np.asarray(point_lps) + to_index[:3, 3]
        margin = margin_mm / spacing
        return bool(
            np.all(index >= margin) and np.all(index <= np.array(geometry.shape) - 1 - margin)
        )

    return inside


def draw_findings(spec: ChestCohortSpec, patient_index: int, th, geometry) -> tuple[list, list]:
    """(nodules, excluded findings) of one patient, from its nodule stream."""
    rng = _stream(spec, patient_index, "nodules")
    p = np.array([0.35 / 0.65] + [0.6**k for k in range(spec.max_nodules)])
    n = int(rng.choice(spec.max_nodules + 1, p=p / p.sum())) if spec.max_nodules else 0
    lo, hi = spec.nodule_diameter_mm
    # skewed to small nodules: log-diameter uniform after a power 1.3 of the share
    diameters = [float(lo * (hi / lo) ** (rng.random() ** 1.3)) for _ in range(n)]
    kinds = [str(rng.choice(chest_phantom.NODULE_KINDS, p=[0.55, 0.2, 0.25])) for _ in range(n)]
    kinds = [k if d >= 3 else "small" for k, d in zip(kinds, diameters, strict=True)]
    n_small, n_calcified = int(rng.integers(0, 2)), int(rng.integers(0, 3))
    kinds += ["small"] * n_small + ["calcified"] * n_calcified
    diameters += list(rng.uniform(1.5, 2.9, n_small)) + list(rng.uniform(2, 6, n_calcified))
    found = chest_phantom.sample_nodules(rng, th, kinds, diameters, _in_view(geometry))
    nodules = [f for f in found if f.kind in chest_phantom.NODULE_KINDS]
    return nodules, [f for f in found if f.kind in chest_phantom.EXCLUDED_KINDS]


def render_pixels(spec, patient_index: int, plan: SeriesPlan, th, findings) -> np.ndarray:
    """Stored pixel values (slices, rows, columns) of the patient's series."""
    geometry = plan.geometry
    corners = np.array([[k, j, i, 1] for k in (0, geometry.shape[0] - 1)
                        for j in (0, geometry.shape[1] - 1) for i in (0, geometry.shape[2] - 1)])  # fmt: skip
    z = (corners @ geometry.index_to_lps().T)[:, 2]
    reach = geometry.thickness_mm + 2 * phantom_spacing_mm(spec.scale)
    phantom = chest_phantom.build_phantom(
        th, findings, phantom_spacing_mm(spec.scale), (z.min() - reach, z.max() + reach)
    )
    hu = sample_volume(phantom, phantom.signal["hu_plus_1000"], geometry) - 1000
    del phantom
    blur_px = plan.kernel[1] / geometry.row_spacing_mm
    hu = ndimage.gaussian_filter(hu, (0, blur_px, blur_px))
    # noise correlated in-plane, as reconstruction makes it, scaled back to noise_hu
    delta = np.zeros((15, 15), np.float32)
    delta[7, 7] = 1
    gain = float(np.sqrt((ndimage.gaussian_filter(delta, 0.8) ** 2).sum()))
    noise = _stream(spec, patient_index, "noise").standard_normal(geometry.shape, np.float32)
    hu += ndimage.gaussian_filter(noise, (0, 0.8, 0.8)) * np.float32(plan.noise_hu / gain)
    del noise
    scanner = plan.scanner
    top = 2**scanner.bits_stored - 1 if not scanner.pixel_representation else 2**15 - 1
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, top)
    if scanner.padding is not None:
        half = (geometry.shape[1] - 1) / 2
        j, i = np.ogrid[: geometry.shape[1], : geometry.shape[2]]
        stored[:, (j - half) ** 2 + (i - half) ** 2 > (half + 0.5) ** 2] = scanner.padding
    return stored.astype(np.int16 if scanner.pixel_representation else np.uint16)


# ---------------------------------------------------------------------------- writing
def _datasets(spec, patient_index: int, plan: SeriesPlan, pixels: np.ndarray, series_uid: str):
    scanner, geometry = plan.scanner, plan.geometry
    identity = patient_identity(spec.seed, patient_index)
    fields = {
        **identity,
        **plan.study,
        "AcquisitionDate": plan.study["StudyDate"],
        "AcquisitionTime": plan.study["StudyTime"],
        "PatientAge": patient_age(identity["PatientBirthDate"], plan.study["StudyDate"]),
        "SOPClassUID": CT_IMAGE_STORAGE,
        "StudyInstanceUID": uid(spec.seed, "ct-study", patient_index),
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": uid(spec.seed, "ct-frame", patient_index),
        "PositionReferenceIndicator": "",
        "Modality": "CT",
        "Manufacturer": scanner.manufacturer,
        "ManufacturerModelName": scanner.model,
        "SoftwareVersions": scanner.software,
        "SeriesDescription": plan.description,
        "ProtocolName": plan.description,
        "SeriesNumber": 2,
        "AcquisitionNumber": 1,
        "BodyPartExamined": "CHEST",
        "PatientPosition": plan.position,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ConvolutionKernel": plan.kernel[0],
        **plan.exposure,
        "ReconstructionDiameter": decimal_string(geometry.row_spacing_mm * geometry.shape[2], 2),
        "GantryDetectorTilt": "0",
        "SliceThickness": decimal_string(geometry.thickness_mm, 4),
        "SpacingBetweenSlices": decimal_string(geometry.slice_step_mm, 4),
        "PixelSpacing": [decimal_string(geometry.row_spacing_mm)] * 2,
        "ImageOrientationPatient": [
            decimal_string(v, _COSINE_DECIMALS)
            for v in (*geometry.row_cosine, *geometry.col_cosine)
        ],  # fmt: skip
        "Rows": geometry.shape[1],
        "Columns": geometry.shape[2],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": scanner.bits_stored,
        "HighBit": scanner.bits_stored - 1,
        "PixelRepresentation": scanner.pixel_representation,
        "RescaleIntercept": str(RESCALE_INTERCEPT),
        "RescaleSlope": "1",
        "RescaleType": "HU",
        "WindowCenter": "-600",
        "WindowWidth": "1500",
    }
    if scanner.padding is not None:
        fields["PixelPaddingValue"] = scanner.padding
    template = dataset_from(fields)
    for k, position in enumerate(geometry.positions_lps()):
        ds = Dataset()
        ds.update(template)
        ds.SOPInstanceUID = uid(spec.seed, "ct-sop", patient_index, k)
        ds.InstanceNumber = plan.instance_numbers[k]
        ds.ImagePositionPatient = [decimal_string(v, _POSITION_DECIMALS) for v in position]
        ds.SliceLocation = decimal_string(float(position[2]), 3)
        ds.PixelData = pixels[k].astype("<i2" if scanner.pixel_representation else "<u2").tobytes()
        yield ds


def _write_patient(spec: ChestCohortSpec, root: str, job: tuple[int, str]) -> dict:
    patient_index, setup = job
    th = chest_phantom.sample_thorax(_stream(spec, patient_index, "anatomy"))
    plan = plan_series(spec, patient_index, setup, th)
    nodules, excluded = draw_findings(spec, patient_index, th, plan.geometry)
    pixels = render_pixels(spec, patient_index, plan, th, nodules + excluded)
    series_uid = uid(spec.seed, "ct-series", patient_index)
    paths = [Path(root) / "dicom" / plan.folder / name for name in plan.file_names]
    write_series(_datasets(spec, patient_index, plan, pixels, series_uid), plan.syntax, paths)

    def rows(findings, diameter):
        return [[series_uid, *np.round(f.centre_lps, 3), diameter(f)] for f in findings]

    return {
        "study_uid": uid(spec.seed, "ct-study", patient_index),
        "accession": plan.study["AccessionNumber"],
        "identity": patient_identity(spec.seed, patient_index),
        "seriesuid": series_uid,
        "nodules": rows(nodules, lambda f: round(f.diameter_mm, 2)),
        "excluded": rows(
            excluded, lambda f: -1 if f.kind == "calcified" else round(f.diameter_mm, 2)
        ),
    }


def synthesize_chest_cohort(
    root: str | os.PathLike,
    n_patients: int = ChestCohortSpec.n_patients,
    seed: int = ChestCohortSpec.seed,
    *,
    workers: int = 1,
    progress: bool = True,
    scale: float = 1.0,
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
    max_nodules: int = 4,
    n_junk_files: int = 2,
    slab_mm: float | None = None,
) -> dict[str, Path]:
    """Write the cohort (module docstring) under `root`, which must be empty or absent.
    Returns the paths written: "dicom" (folder), "annotations", "annotations_excluded"
    and "seriesuids" (tables)."""
    out = require_empty(root)
    spec = ChestCohortSpec(n_patients, seed, scale, tuple(nodule_diameter_mm), max_nodules,
                           n_junk_files, slab_mm)  # fmt: skip
    jobs = list(enumerate(acquisition_setups(spec)))
    write = partial(_write_patient, spec, str(out))
    cases = map_jobs(write, jobs, workers=workers, progress=progress, unit="patient")
    paths = {
        "dicom": out / "dicom",
        "annotations": out / "annotations.csv",
        "annotations_excluded": out / "annotations_excluded.csv",
        "seriesuids": out / "seriesuids.csv",
    }
    write_junk(spec.seed, paths["dicom"], cases[0], spec.n_junk_files, min_victim_bytes=10_000)
    cases.sort(key=lambda c: c["seriesuid"])
    for key in ("nodules", "excluded"):
        table = paths["annotations" if key == "nodules" else "annotations_excluded"]
        write_csv(table, ANNOTATION_COLUMNS, [row for c in cases for row in c[key]])
    write_csv(paths["seriesuids"], SERIES_COLUMNS,
              [[c["seriesuid"], int(bool(c["nodules"]))] for c in cases])  # fmt: skip
    return paths
