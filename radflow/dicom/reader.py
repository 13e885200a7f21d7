"""radflow's own DICOM pixel path: projection radiographs, and the few cross-sectional
cases where dcm2niix is wrong or unable (see `radflow.dicom.convert.choose_route`).

Layout (the inverse is `radflow.dicom.nifti.read_image`):
- Voxel (i, j, k) is column i, row j of slice k of the DICOM pixel data, unflipped:
  ``nifti_data[:, :, k] == pixel_array_k.T``.
- The affine maps voxels to RAS+ millimetres (DICOM LPS with x and y negated); its
  columns are row cosine * column spacing, column cosine * row spacing and slice normal *
  slice spacing; the translation is ImagePositionPatient of slice k = 0.
- 2D projection units (DX, CR, MG...): one slice of thickness 1 mm; spacing from
  PixelSpacing, else ImagerPixelSpacing (dcm2niix writes 1 mm there), else 1 mm (noted in
  the sidecar). Without ImageOrientationPatient the orientation is the identity LPS
  direction with origin 0: nominal, only spacing and row/column layout mean something.
- 3D units on this path are regular stacks only: slices sorted by ImagePositionPatient
  along the normal, even steps, no in-plane shift. Uneven spacing, gantry tilt, repeated
  positions (4D) and multi-frame files fail with a reason: dcm2niix handles those.

Pixel decoding: `radflow.dicom.syntax.decode_pixels` (one pinned decoder per transfer
syntax) or, for uncompressed data, a direct read at the file offset. Stored values follow
PixelRepresentation and BitsStored. Intensities: RescaleSlope/Intercept per slice, or the
Modality LUT Sequence (dcm2niix ignores it); int16/int32 when every value is an integer,
float32 otherwise; no scaling in the header. MONOCHROME1 is inverted so that higher means
brighter: new = lo + hi - value over the range BitsStored can represent after rescale
(dcm2niix does not invert). Memory: headers, the output volume and one decoded slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
)

from radflow.dicom.headers import ORIENTATION_TOLERANCE, SAME_POSITION_MM
from radflow.dicom.syntax import DecodeError, decode_pixels, syntax_problem, transfer_syntax

#: Largest allowed deviation of a slice step from the median step: max(absolute, relative
#: * median). Positions are written with ~0.001 mm precision; real gaps are >= 0.1 mm.
SLICE_STEP_TOLERANCE_MM = 0.01
SLICE_STEP_TOLERANCE_REL = 0.01
_DEFER_BYTES = 64 * 1024
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class ConversionError(Exception):
    """A unit cannot be converted; the message is the PHI-free reason for the manifest."""


@dataclass
class Geometry:
    """Where the voxels are: RAS affine (4x4, mm), voxel spacing (x, y, z) in mm, the order
    in which the unit's datasets become slices k = 0, 1, ... and notes for the sidecar."""

    affine: np.ndarray
    spacing: tuple[float, float, float]
    order: list[int]
    notes: dict[str, Any]


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def ras_affine(
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    slice_vector: np.ndarray,
    row_spacing: float,
    col_spacing: float,
    slice_spacing: float,
    origin_lps: np.ndarray,
) -> np.ndarray:
    """The 4x4 voxel -> RAS mm affine of a DICOM slice stack (voxel i = column, j = row).

    row_cosine: LPS direction of increasing column index; col_cosine: of increasing row
    index; slice_vector: unit LPS direction from slice k to k+1; spacings in mm
    (row_spacing = distance between rows); origin_lps: centre of voxel (0, 0, 0).
    """
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * col_spacing
    lps[:3, 1] = col_cosine * row_spacing
    lps[:3, 2] = slice_vector * slice_spacing
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise ConversionError("ImageOrientationPatient is not a pair of orthonormal vectors")
    return r / nr, c / nc


def _pixel_spacing(ds: pydicom.Dataset, *, allow_imager: bool) -> tuple[np.ndarray, str] | None:
    keywords = ("PixelSpacing", "ImagerPixelSpacing") if allow_imager else ("PixelSpacing",)
    for keyword in keywords:
        spacing = _floats(ds, keyword, 2)
        if spacing is not None and np.all(spacing > 0):
            return spacing, keyword
    return None


def projection_geometry(ds: pydicom.Dataset) -> Geometry:
    """Geometry of a 2D projection image (see the module docstring for the defaults)."""
    notes: dict[str, Any] = {}
    found = _pixel_spacing(ds, allow_imager=True)
    if found is None:
        spacing, notes["spacing_source"] = np.array([1.0, 1.0]), "none: 1.0 mm assumed"
    else:
        spacing, notes["spacing_source"] = found
    cosines = _orientation(ds)
    if cosines is None:
        r, c = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        origin = np.zeros(3)
        notes["orientation_source"] = "none: identity orientation, origin 0 (nominal)"
    else:
        r, c = cosines
        position = _floats(ds, "ImagePositionPatient", 3)
        origin = position if position is not None else np.zeros(3)
        notes["orientation_source"] = "ImageOrientationPatient"
    affine = ras_affine(r, c, np.cross(r, c), spacing[0], spacing[1], 1.0, origin)
    return Geometry(affine, (float(spacing[1]), float(spacing[0]), 1.0), [0], notes)


def load_slices(paths: Sequence[str]) -> list[pydicom.Dataset]:
    """Read a unit's files (absolute paths), pixel data deferred (read slice by slice by
    `slice_pixels`) except in deflated files, whose offsets point into the inflated stream.
    Multi-frame files fail: this path handles single-frame slices only."""
    out: list[pydicom.Dataset] = []
    for path in paths:
        # force: raw datasets without preamble or file meta, which the index accepted
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
        if transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(path, force=True)
        grayscale_photometric(ds)  # colour is the reason, before any frame geometry
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ConversionError("multi-frame file on radflow's own reader (single-frame only)")
        out.append(ds)
    return out


def _fmt_steps(steps: np.ndarray) -> str:
    values = sorted({float(f"{s:.3g}") for s in steps})
    shown = ", ".join(f"{v:g}" for v in values[:6])
    return shown + (", ..." if len(values) > 6 else "")


def stack_geometry(datasets: Sequence[pydicom.Dataset]) -> Geometry:
    """Geometry of a regular stack of parallel slices; ConversionError if it is not one
    (missing geometry, orientation or spacing varying, repeated positions, uneven steps,
    in-plane shifts: dcm2niix's cases)."""
    cosines, positions, spacings = [], [], []
    for ds in datasets:
        orientation = _orientation(ds)
        position = _floats(ds, "ImagePositionPatient", 3)
        if orientation is None or position is None:
            raise ConversionError("missing ImageOrientationPatient or ImagePositionPatient")
        found = _pixel_spacing(ds, allow_imager=False)
        if found is None:
            raise ConversionError("missing PixelSpacing")
        cosines.append(np.concatenate(orientation))
        positions.append(position)
        spacings.append(found[0])
    cosines_a, positions_a, spacings_a = np.array(cosines), np.array(positions), np.array(spacings)
    if np.abs(cosines_a - cosines_a[0]).max() > ORIENTATION_TOLERANCE:
        raise ConversionError("ImageOrientationPatient differs between slices")
    if np.abs(spacings_a - spacings_a[0]).max() > 1e-4:
        raise ConversionError("PixelSpacing differs between slices")
    r, c = cosines_a[0, :3], cosines_a[0, 3:]
    normal = np.cross(r, c)
    normal /= np.linalg.norm(normal)
    along = positions_a @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along = along[order]
    row_spacing, col_spacing = spacings_a[0]
    notes: dict[str, Any] = {"spacing_source": "PixelSpacing",
                             "orientation_source": "ImageOrientationPatient"}  # fmt: skip
    origin = positions_a[order[0]]
    if len(datasets) == 1:
        ds = datasets[0]
        thickness = next(
            (float(ds.get(k)) for k in ("SpacingBetweenSlices", "SliceThickness") if ds.get(k)),
            1.0,
        )
        step = thickness if thickness > 0 else 1.0
        notes["slice_spacing_source"] = "single slice: SpacingBetweenSlices/SliceThickness"
        affine = ras_affine(r, c, normal, row_spacing, col_spacing, step, origin)
        return Geometry(affine, (float(col_spacing), float(row_spacing), step), order, notes)
    steps = np.diff(along)
    same = int((steps < SAME_POSITION_MM).sum())
    if same:
        raise ConversionError(
            f"{same + 1} or more slices share a position (a 4D series), which radflow's own "
            "reader does not stack"
        )
    median = float(np.median(steps))
    tolerance = max(SLICE_STEP_TOLERANCE_MM, SLICE_STEP_TOLERANCE_REL * median)
    notes["slice_spacing_source"] = "ImagePositionPatient"
    offsets = positions_a[order] - origin
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.linalg.norm(in_plane, axis=1).max() > tolerance:
        raise ConversionError(
            "slices are shifted in-plane along the stack (gantry tilt), which radflow's own "
            "reader does not correct"
        )
    if np.abs(steps - median).max() > tolerance:
        raise ConversionError(
            f"uneven slice spacing ({_fmt_steps(steps)} mm), which radflow's own reader does "
            "not resample"
        )
    step = float((along[-1] - along[0]) / (len(along) - 1))
    affine = ras_affine(r, c, normal, row_spacing, col_spacing, step, origin)
    return Geometry(affine, (float(col_spacing), float(row_spacing), step), order, notes)


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The values BitsStored bits can hold: [0, 2^b - 1] or [-2^(b-1), 2^(b-1) - 1]."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise ConversionError("RescaleSlope or RescaleIntercept is not a number") from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise ConversionError("RescaleSlope is zero or not finite")
    return slope, intercept


def _check_pixels(datasets: Sequence[pydicom.Dataset]) -> str:
    """Checks that need no pixel decoding; returns the common PhotometricInterpretation."""
    photometrics = set()
    sizes = set()
    problems: dict[str, str] = {}  # per transfer syntax: the slices of a unit share one
    for ds in datasets:
        photometric = grayscale_photometric(ds)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ConversionError("multi-frame file on radflow's own reader (single-frame only)")
        if "PixelData" not in ds:
            raise ConversionError("no pixel data")
        syntax = transfer_syntax(ds)
        if syntax not in problems:
            problems[syntax] = syntax_problem(syntax)
        problem = problems[syntax]
        if problem:
            raise ConversionError(problem)
        photometrics.add(photometric)
        sizes.add((int(ds.Rows), int(ds.Columns)))
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ConversionError(f"image sizes (rows x columns) differ between slices: {shown}")
    if len(photometrics) > 1:
        raise ConversionError("MONOCHROME1 and MONOCHROME2 slices mixed in one unit")
    return photometrics.pop()


def grayscale_photometric(ds: pydicom.Dataset) -> str:
    """PhotometricInterpretation of a grayscale image; ConversionError for colour."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in _GRAYSCALE or samples != 1:
        raise ConversionError(
            f"colour image (PhotometricInterpretation {photometric or 'missing'}) "
            "in a grayscale study"
        )
    return photometric


def slice_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values (rows, columns) of one single-frame slice, by the pinned decoder
    (`radflow.dicom.syntax`); bits above BitsStored are masked (sign-extended for signed
    data) as pydicom does. The only place this path decodes pixel data."""
    try:
        return decode_pixels(ds)
    except DecodeError as exc:
        raise ConversionError(str(exc)) from exc


def _lut_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Smallest and largest output of the Modality LUT (it maps every input to an entry)."""
    try:
        item = ds.ModalityLUTSequence[0]
        n_entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        values = np.asarray(apply_modality_lut(np.arange(first, first + n_entries), ds))
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise ConversionError("Modality LUT Sequence is malformed") from exc
    return float(values.min()), float(values.max())


def build_volume(
    datasets: Sequence[pydicom.Dataset], photometric: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rescaled (and MONOCHROME1-inverted) pixel values of slices in the given order.

    Input: datasets (pixel data may be deferred), already in slice order; each slice is
    decoded (`slice_pixels`) straight into the output array. Output: array of shape
    (slices, rows, columns) in DICOM display order, in rescaled units (HU for CT):
    float32 unless every slope, intercept and LUT value is an integer; then int16 if every
    value fits, else int32 (the slices before the first that needs it are widened once);
    and notes for the sidecar. `photometric`: what `_check_pixels(datasets)` returned
    when the caller already ran it (None: it runs here).
    """
    if photometric is None:
        photometric = _check_pixels(datasets)
    luts = ["ModalityLUTSequence" in ds for ds in datasets]
    rescales = [(1.0, 0.0) if lut else _rescale(ds) for ds, lut in zip(datasets, luts, strict=True)]
    ranges = []
    for ds, (slope, intercept), lut in zip(datasets, rescales, luts, strict=True):
        if lut:
            ranges.append(_lut_range(ds))
            continue
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        lo, hi = stored_range(bits, signed)
        ends = (slope * lo + intercept, slope * hi + intercept)
        ranges.append((min(ends), max(ends)))
    lo_possible = min(r[0] for r in ranges)
    hi_possible = max(r[1] for r in ranges)
    integral = all(float(s).is_integer() and float(b).is_integer() for s, b in rescales)
    integral = integral and all(
        float(r[0]).is_integer() and float(r[1]).is_integer() for r in ranges
    )
    integral = integral and -(2**31) <= lo_possible and hi_possible < 2**31
    work_dtype = np.int64 if integral else np.float64
    inverted = photometric == "MONOCHROME1"
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    int16 = np.iinfo(np.int16)
    # decoded one slice at a time into the final type: int16 until a slice needs int32
    volume = np.empty((len(datasets), rows, cols), np.int16 if integral else np.float32)
    for k, (ds, (slope, intercept)) in enumerate(zip(datasets, rescales, strict=True)):
        pixels = slice_pixels(ds)
        if pixels.shape != (rows, cols):
            raise ConversionError(f"pixel data shape {pixels.shape} does not match Rows/Columns")
        small_int = pixels.dtype.kind in "iu" and pixels.itemsize <= 2
        if integral and not luts[k] and not inverted and slope == 1 and small_int:
            # The common CT case (8/16-bit values, slope 1, integer intercept), with fewer
            # passes over the slice than the general path below (the per-slice work
            # counts for series of many small slices): value + intercept computed in
            # int32 is exact (|value| < 2^16, every result is within the int32 range
            # checked above), and its extremes are those of the stored values.
            offset = int(intercept)
            values = np.add(pixels, np.int32(offset), dtype=np.int32)
            if volume.dtype == np.int16 and pixels.size:
                if int(pixels.min()) + offset < int16.min or int(pixels.max()) + offset > int16.max:
                    volume = volume.astype(np.int32)  # once, when a slice first needs it
            volume[k] = values
            continue
        if luts[k]:
            values = np.asarray(apply_modality_lut(pixels, ds)).astype(work_dtype)
        else:
            values = pixels.astype(work_dtype) * work_dtype(slope) + work_dtype(intercept)
        if not integral:
            values = values.astype(np.float32)
            if inverted:
                values = (np.float64(lo_possible + hi_possible) - values).astype(np.float32)
            volume[k] = values
            continue
        values = values.astype(np.int32)  # every integral result fits (range checked above)
        if inverted:
            values = (int(lo_possible) + int(hi_possible)) - values
        if volume.dtype == np.int16 and values.size:
            if values.min() < int16.min or values.max() > int16.max:
                volume = volume.astype(np.int32)  # once, when a slice first needs it
        volume[k] = values
    notes = {
        "inverted_monochrome1": inverted,
        "rescale_applied": any(s != 1 or b != 0 for s, b in rescales),
        "rescale_varies_between_slices": len(set(rescales)) > 1,
        "modality_lut_applied": any(luts),
    }
    if inverted:
        notes["monochrome1_inversion"] = f"value -> {lo_possible:g} + {hi_possible:g} - value"
    return volume, notes
