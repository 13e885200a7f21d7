"""Convert the image units of one shard from DICOM to NIfTI-1 (.nii.gz + JSON sidecar).

Layout and geometry (the same as dcm2niix up to the order in which axes are stored, which
`nibabel.as_closest_canonical` removes; tests/test_convert.py and
tests/test_series_structure.py check it against dcm2niix):

- Voxel (i, j, k) is column i, row j of slice k of the DICOM pixel data, unflipped:
  ``nifti_data[:, :, k] == pixel_array_k.T``. `radflow.dicom.nifti.read_image` inverts it.
- The affine maps voxels to RAS+ millimetres. DICOM positions are LPS, so the x and y
  rows of the LPS affine are negated. Its columns are row cosine * column spacing,
  column cosine * row spacing and slice normal * slice spacing; the translation is the
  ImagePositionPatient of slice k = 0 (PixelSpacing is [between rows, between columns]).
- 3D units: slices are sorted by the projection of ImagePositionPatient onto the slice
  normal (row cosine x column cosine), never by InstanceNumber. Repeated positions (stacks
  the index could not separate) and irregular in-plane shifts fail the unit with a reason.
- Uneven spacing (a missing slice, variable steps): with ``uneven_spacing="resample"``
  (config convert.uneven_spacing, the default) the stack is interpolated linearly along
  the normal onto a regular grid from the first slice at the *smallest* step, which is
  what dcm2niix writes as its "_Eq_1" file (same grid and values in the tests); the
  sidecar's "uneven_spacing" records the step statistics. "reject" fails the unit.
- Gantry tilt (slices shifted in-plane in proportion to their distance along the normal):
  with ``gantry_tilt="correct"`` (the default) each slice is shifted back by linear
  interpolation onto an orthogonal grid that covers every shifted slice, voxels no slice
  covers holding the volume minimum; that is the grid of dcm2niix's "_Tilt_1" file (same
  shape and affine). dcm2niix v1.0.20260724 places the rows ~0.4 row off their DICOM
  position on the tested series, so values agree to interpolation tolerance only. The
  sidecar's "gantry_tilt" records the angle. "reject" fails the unit.
  Resampled integer data are rounded to the nearest integer (as dcm2niix).
- Multi-frame files: a unit lists the frames it uses (`conventions.FRAMES`); each frame
  becomes a `FrameView` whose position, orientation, spacing and rescale come from the
  shared and per-frame functional groups (enhanced CT/MR), or, for legacy multi-frame
  files without them, from ImagePositionPatient + k * SpacingBetweenSlices (else
  SliceThickness) along the normal (dcm2niix assumes the same).
- 2D projection units (DX, CR, MG...): one slice of thickness 1 mm. Spacing comes from
  PixelSpacing, else ImagerPixelSpacing, else 1 mm (noted in the sidecar); dcm2niix
  (v1.0.20260724) ignores ImagerPixelSpacing and writes 1 mm, the one deliberate
  difference. Without
  ImageOrientationPatient the orientation is the identity LPS direction (columns run to
  patient left, rows to posterior) with origin 0. dcm2niix writes such files with
  qform/sform code 0, i.e. no orientation at all, and nibabel reads them with the same
  axis directions, so radflow agrees with it up to a translation; radflow sets code 1
  because downstream tools warn on code 0. This geometry is nominal: only the spacing and
  the row/column layout mean something, the projection has no patient position.

Pixel decoding: `radflow.dicom.syntax.decode_pixels` (one pinned decoder per transfer
syntax); an unsupported or undecodable syntax fails the unit with a reason naming it.
Stored values follow PixelRepresentation where dcm2niix (v1.0.20260724) does not: signed
8-bit data (dcm2niix reads them unsigned) and JPEG 2000 codestreams whose own signedness
contradicts the header (dcm2niix keeps the codestream's). Lossy JPEG may differ from
dcm2niix by 1 grey level (inverse DCT rounding; tests/test_syntax.py bounds it).

Intensities: RescaleSlope/RescaleIntercept are applied per slice, or the Modality LUT
Sequence where present (pydicom's apply_modality_lut; dcm2niix ignores that LUT and
writes stored values). The data are int16 (or int32 when needed) when every slope,
intercept and LUT value is an integer, float32 otherwise, and the header carries no
scaling. MONOCHROME1 images are inverted so that higher always means brighter:
new = lo + hi - value, where [lo, hi] is the range BitsStored and PixelRepresentation can
represent after rescale (the LUT's range with a LUT; dcm2niix does not invert; the sidecar
records "inverted_monochrome1": true). Pixel data are decoded in one place,
`slice_pixels`.

Memory and cores: files are read with their pixel data deferred (not loaded), geometry is
decided on the headers, then each slice is decoded in slice order straight into the
output array, whose type follows from the rescale (uncompressed data are read at their
offset in the file; compressed data, which pydicom cannot defer, and multi-frame files are
held compressed/whole while their unit converts). `radflow.dicom.nifti.write_nifti`
streams that array into a parallel gzip writer without a transposed copy. Peak memory is
about one output volume plus one decoded slice. `convert_shard` runs many units in
parallel processes and gives a unit left alone the threads to compress it
(`plan_workers`); the files are the same for any number of threads.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from radflow import conventions as C
from radflow.deid import quiet_pydicom, sidecar_fields
from radflow.dicom import radflow_version
from radflow.dicom.index import (
    frame_groups,
    group_value,
    read_shard_files,
    write_bytes_atomic,
    write_tsv,
)
from radflow.dicom.nifti import write_nifti
from radflow.dicom.syntax import DecodeError, decode_pixels, syntax_problem, transfer_syntax

#: Largest allowed deviation of a slice step from the median step: max(absolute, relative
#: * median). Positions are written with ~0.001 mm precision; real gaps are >= 0.1 mm.
SLICE_STEP_TOLERANCE_MM = 0.01
SLICE_STEP_TOLERANCE_REL = 0.01
#: Two slices closer than this along the normal are "at the same position".
SAME_POSITION_MM = 1e-3
#: Largest difference between direction cosines of slices of one unit.
ORIENTATION_TOLERANCE = 1e-4

#: Resampling of an uneven stack may add at most this many slices per original slice
#: (a smallest step far below the others means near-duplicate slices, not a gap).
MAX_RESAMPLE_GROWTH = 4

#: Header values longer than this are not read with the header (only pixel data is so long).
_DEFER_BYTES = 64 * 1024
_PIXEL_DATA = 0x7FE00010
#: Transfer syntaxes whose pixel data sits in the file as it is (read at its offset).
_NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}

MANIFEST_COLUMNS = [C.SERIES_PID, C.STATUS, C.REASON, "ndim", "shape", "spacing_mm", "dtype"]

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class ConversionError(Exception):
    """A unit cannot be converted; the message is the PHI-free reason for the manifest."""


@dataclass
class Resampling:
    """How the stacked slices (k, row, col) map onto the output grid (see `resample`).

    along_mm: position of each stacked slice along the normal, relative to slice 0;
    target_mm: positions of the output slices (None: keep the slices);
    shift_px: in-plane shift of each slice in (rows, columns) relative to slice 0
    (None: no shift); offset_px: output row/column 0 in the pixel frame of slice 0;
    shape: output (rows, columns).
    """

    along_mm: np.ndarray
    target_mm: np.ndarray | None = None
    shift_px: np.ndarray | None = None
    offset_px: tuple[int, int] = (0, 0)
    shape: tuple[int, int] | None = None


@dataclass
class Geometry:
    """Where the voxels are: RAS affine (4x4, mm), voxel spacing (x, y, z) in mm, the order
    in which the unit's datasets become slices k = 0, 1, ..., notes for the sidecar, and
    the resampling the stacked slices need (None: they already are the voxel grid)."""

    affine: np.ndarray
    spacing: tuple[float, float, float]
    order: list[int]
    notes: dict[str, Any]
    resampling: Resampling | None = None


class FrameView(pydicom.Dataset):
    """The header of one frame of a multi-frame file, flattened like a single-frame slice.

    Holds the file's top-level elements (without pixel data and functional groups) with
    the frame's values from the shared and per-frame functional groups set as the
    classic keywords (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness, SpacingBetweenSlices, RescaleSlope/Intercept, EchoTime...).
    `source` is the file's dataset and `frame` the 0-based frame index; `slice_pixels`
    decodes that frame only.
    """

    source: pydicom.Dataset
    frame: int


_MISSING = object()


@functools.cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    return tag, dictionary_VR(tag)


def _get(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """`ds.get(keyword, default)` for the header elements conversion reads per slice.

    Why not `ds.get`: pydicom's value conversion (hooks, DSfloat and MultiValue objects)
    costs ~30 us an element, which dominated conversion time for series of many small
    files. So an element still as read from the file (raw) is parsed here when that is
    exact: DS text whose every value is a number (-> float, or a list of floats for
    several values; pydicom's DSfloat is float() of the same text), a US of one value
    (-> int) and CS text of one value (-> str, decoded and stripped as pydicom does).
    Everything else (other VRs, empty or non-numeric text, values already
    converted or set in code) goes through `ds.get`, so callers see the same numbers.
    The dataset is not modified (pydicom would replace the raw element by its value).
    """
    tag, dictionary_vr = _tag_and_vr(keyword)
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR or dictionary_vr  # implicit VR files: the dictionary's VR, as pydicom
        if vr == "DS":
            # as pydicom: decoded as ISO 8859-1, trailing spaces/NULs removed, split on "\"
            items = elem.value.decode(default_encoding).rstrip(" \x00").split("\\")
            try:
                values = [float(item) for item in items]
            except ValueError:
                return ds.get(keyword, default)
            return values[0] if len(values) == 1 else values
        if vr == "CS" and b"\\" not in elem.value:
            return elem.value.decode(default_encoding).rstrip(" \x00")
        if vr == "US" and len(elem.value) == 2:
            return int.from_bytes(elem.value, "little" if elem.is_little_endian else "big")
    return ds.get(keyword, default)


def _attr(ds: pydicom.Dataset, keyword: str) -> Any:
    """`ds.<keyword>` through `_get`: a missing element raises pydicom's AttributeError."""
    value = _get(ds, keyword, _MISSING)
    return getattr(ds, keyword) if value is _MISSING else value


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = _get(ds, keyword)
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    try:
        value = float(_get(ds, keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


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


#: (functional group macro, element in it, classic keyword set on the frame's view)
_FRAME_ELEMENTS = (
    ("PlanePositionSequence", "ImagePositionPatient", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness", "SliceThickness"),
    ("PixelMeasuresSequence", "SpacingBetweenSlices", "SpacingBetweenSlices"),
    ("PixelValueTransformationSequence", "RescaleSlope", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept", "RescaleIntercept"),
    ("PixelValueTransformationSequence", "RescaleType", "RescaleType"),
    ("MREchoSequence", "EffectiveEchoTime", "EchoTime"),
    ("MRTimingAndRelatedParametersSequence", "RepetitionTime", "RepetitionTime"),
    ("MRTimingAndRelatedParametersSequence", "FlipAngle", "FlipAngle"),
    ("MRDiffusionSequence", "DiffusionBValue", "DiffusionBValue"),
    ("CTExposureSequence", "ExposureTimeInms", "ExposureTime"),
)
_FRAME_SKIPPED = frozenset(
    {"SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames"}
)


def frame_view(ds: pydicom.Dataset, frame: int) -> FrameView:
    """A `FrameView` of frame `frame` (0-based) of the multi-frame dataset `ds`.

    Enhanced objects: values from the functional groups (see `_FRAME_ELEMENTS`). Legacy
    multi-frame objects (no functional groups): frame k lies at ImagePositionPatient +
    k * SpacingBetweenSlices (else SliceThickness) along the slice normal; without those
    elements the geometry is unknown and ConversionError is raised.
    """
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise ConversionError(f"frame {frame} requested from a file with {n_frames} frames")
    view = FrameView()
    for elem in ds:
        if elem.keyword not in _FRAME_SKIPPED:
            # a shallow copy: setting a value below must not change the file's dataset
            view.add(copy.copy(elem))
    groups = frame_groups(ds, frame)
    for macro, inner, keyword in _FRAME_ELEMENTS:
        value = group_value(groups, macro, inner)
        if value is not None:
            setattr(view, keyword, value)
    if not groups and frame > 0:
        orientation = _orientation(ds)
        position = _floats(ds, "ImagePositionPatient", 3)
        step = _float(ds, "SpacingBetweenSlices") or _float(ds, "SliceThickness")
        if orientation is None or position is None or not step:
            raise ConversionError(
                "legacy multi-frame file without ImageOrientationPatient, "
                "ImagePositionPatient and SpacingBetweenSlices/SliceThickness: frame "
                "positions unknown"
            )
        normal = np.cross(*orientation)
        view.ImagePositionPatient = [f"{v:.6f}" for v in position + frame * step * normal]
    view.source = ds
    view.frame = frame
    return view


def load_slices(
    files: Sequence[tuple[str, str]], dicom_root: str | os.PathLike
) -> list[pydicom.Dataset]:
    """Read a unit's files: (path relative to `dicom_root`, frames) pairs as in the shard
    table (`conventions.FRAMES`: "" = the file's every frame). Returns one dataset per
    slice: the file's dataset for a single-frame file, a `FrameView` per frame otherwise."""
    out: list[pydicom.Dataset] = []
    for rel, frames in files:
        # force: raw datasets without preamble or file meta, which the index accepted;
        # pixel data deferred (read slice by slice by slice_pixels), except in deflated
        # files, whose offsets point into the inflated stream, not the file
        path = os.path.join(dicom_root, rel)
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
        if transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(path, force=True)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        _grayscale_photometric(ds)  # colour is the reason, before any frame geometry
        if n_frames == 1 and not frames.strip():
            out.append(ds)
            continue
        try:
            indices = [int(f) for f in frames.split()] if frames.strip() else range(n_frames)
        except ValueError as exc:
            raise ConversionError(
                "frames column of the shard table is not a list of integers"
            ) from exc
        out.extend(frame_view(ds, i) for i in indices)
    return out


def _fmt_steps(steps: np.ndarray) -> str:
    values = sorted({float(f"{s:.3g}") for s in steps})
    shown = ", ".join(f"{v:g}" for v in values[:8])
    return shown + (", ..." if len(values) > 8 else "")


def _interpolate(values: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `values` along `axis` at fractional indices `coords`;
    coordinates outside [0, n - 1] give NaN."""
    n = values.shape[axis]
    inside = (coords >= -1e-6) & (coords <= n - 1 + 1e-6)
    x = np.clip(coords, 0, n - 1)
    lower = np.minimum(np.floor(x).astype(int), max(n - 2, 0))
    weight = x - lower
    upper = np.minimum(lower + 1, n - 1)
    shape = [1] * values.ndim
    shape[axis] = len(coords)
    weight = weight.reshape(shape)
    out = np.take(values, lower, axis=axis) * (1 - weight)
    out += np.take(values, upper, axis=axis) * weight
    if not inside.all():
        outside: list[Any] = [slice(None)] * values.ndim
        outside[axis] = ~inside
        out[tuple(outside)] = np.nan
    return out


def resample(volume: np.ndarray, plan: Resampling) -> np.ndarray:
    """Apply a `Resampling` to stacked slices (k, rows, cols); returns the output grid.

    Gantry tilt: each slice is shifted in-plane by -shift_px (linear interpolation along
    rows and columns) onto a grid that covers every shifted slice; voxels no slice covers
    get the volume's minimum (as dcm2niix). Uneven spacing: the output slices at
    target_mm are linearly interpolated between their two neighbours along the normal.
    Integral input is rounded to the nearest integer and keeps its integer type.
    """
    integral = np.issubdtype(volume.dtype, np.integer)
    work = volume.astype(np.float64)
    fill = float(work.min()) if work.size else 0.0
    if plan.shift_px is not None:
        rows, cols = plan.shape
        out = np.empty((work.shape[0], rows, cols))
        for k in range(work.shape[0]):
            r = np.arange(rows) + plan.offset_px[0] - plan.shift_px[k, 0]
            c = np.arange(cols) + plan.offset_px[1] - plan.shift_px[k, 1]
            out[k] = _interpolate(_interpolate(work[k], r, 0), c, 1)
        work = np.where(np.isnan(out), fill, out)
    if plan.target_mm is not None:
        index = np.interp(plan.target_mm, plan.along_mm, np.arange(len(plan.along_mm)))
        work = _interpolate(work, index, 0)
    if integral:
        work = np.rint(work)
        info = np.iinfo(volume.dtype)
        if work.size and (work.min() < info.min or work.max() > info.max):
            return work.astype(np.int32)
        return work.astype(volume.dtype)
    return work.astype(np.float32)


def volume_geometry(
    datasets: Sequence[pydicom.Dataset],
    *,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
) -> Geometry:
    """Geometry of a stack of parallel slices; raises ConversionError if it is not one.

    uneven_spacing: "reject" fails a stack whose steps along the normal differ by more than
    the tolerance (a missing slice, variable spacing); "resample" puts it on a regular grid
    at the smallest step (as dcm2niix's "_Eq" output) by linear interpolation along the
    normal. gantry_tilt: "reject" fails a stack whose slices shift in-plane in proportion to
    their distance along the normal (a tilted CT gantry); "correct" shifts every slice
    back onto an orthogonal grid that covers them all (as dcm2niix's "_Tilt" output).
    Both record what they did in the notes (sidecar). Irregular in-plane shifts fail.
    """
    if uneven_spacing not in C.UNEVEN_SPACING_CHOICES:
        raise ValueError(f"uneven_spacing must be one of {C.UNEVEN_SPACING_CHOICES}")
    if gantry_tilt not in C.GANTRY_TILT_CHOICES:
        raise ValueError(f"gantry_tilt must be one of {C.GANTRY_TILT_CHOICES}")
    cosines = []
    positions = []
    spacings = []
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
    notes: dict[str, Any] = {"spacing_source": "PixelSpacing"}
    notes["orientation_source"] = "ImageOrientationPatient"
    origin = positions_a[order[0]]
    shape = (int(_attr(datasets[0], "Rows")), int(_attr(datasets[0], "Columns")))
    plan = Resampling(along_mm=along - along[0])
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
            f"{same + 1} or more slices share a position (several stacks in one series "
            "that no echo, time point, acquisition or b-value key separates)"
        )
    median = float(np.median(steps))
    tolerance = max(SLICE_STEP_TOLERANCE_MM, SLICE_STEP_TOLERANCE_REL * median)
    notes["slice_spacing_source"] = "ImagePositionPatient"

    offsets = positions_a[order] - origin
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.linalg.norm(in_plane, axis=1).max() > tolerance:
        # A gantry tilt shears the stack: in-plane offset = distance along the normal * v.
        distance = along - along[0]
        shear = (distance @ in_plane) / (distance @ distance)
        residual = np.linalg.norm(in_plane - np.outer(distance, shear), axis=1).max()
        tilt_deg = float(np.degrees(np.arctan(np.linalg.norm(shear))))
        header_tilt = _float(datasets[0], "GantryDetectorTilt")
        if residual > tolerance:
            raise ConversionError(
                "slices are shifted in-plane irregularly along the stack (not a gantry tilt)"
            )
        if gantry_tilt == "reject":
            raise ConversionError(
                f"gantry tilt of {tilt_deg:.3g} degrees (slices shifted in-plane along the "
                "stack); set convert.gantry_tilt: correct to resample it"
            )
        shift = np.column_stack([in_plane @ c / row_spacing, in_plane @ r / col_spacing])
        low = np.floor(shift.min(axis=0) + 1e-6).astype(int)
        high = np.ceil(shift.max(axis=0) - 1e-6).astype(int)
        plan.shift_px = shift
        plan.offset_px = (int(low[0]), int(low[1]))
        shape = (shape[0] + int(high[0] - low[0]), shape[1] + int(high[1] - low[1]))
        plan.shape = shape
        origin = origin + low[0] * row_spacing * c + low[1] * col_spacing * r
        notes["gantry_tilt"] = {
            "action": "corrected",
            "tilt_deg_from_positions": round(tilt_deg, 4),
            "GantryDetectorTilt": header_tilt,
            "method": "each slice shifted in-plane onto an orthogonal grid (linear)",
        }
    if np.abs(steps - median).max() > tolerance:
        described = f"steps of {_fmt_steps(steps)} mm between slices (tolerance {tolerance:.3g} mm)"
        if uneven_spacing == "reject":
            raise ConversionError(
                f"uneven slice spacing: {described}; set convert.uneven_spacing: resample to "
                "interpolate it"
            )
        step = float(steps.min())
        extent = float(along[-1] - along[0])
        n_out = int(np.floor(extent / step + 1e-6)) + 1
        if n_out > MAX_RESAMPLE_GROWTH * len(along):
            raise ConversionError(f"uneven slice spacing too irregular to resample: {described}")
        plan.target_mm = np.arange(n_out) * step
        notes["uneven_spacing"] = {
            "action": "resampled",
            "method": "linear interpolation along the slice normal at the smallest step",
            "step_mm": round(step, 6),
            "original_slices": len(along),
            "original_step_min_mm": round(float(steps.min()), 6),
            "original_step_median_mm": round(median, 6),
            "original_step_max_mm": round(float(steps.max()), 6),
        }
    else:
        step = float((along[-1] - along[0]) / (len(along) - 1))
    affine = ras_affine(r, c, normal, row_spacing, col_spacing, step, origin)
    needs = plan.shift_px is not None or plan.target_mm is not None
    return Geometry(
        affine, (float(col_spacing), float(row_spacing), step), order, notes,
        plan if needs else None,
    )  # fmt: skip


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The values BitsStored bits can hold: [0, 2^b - 1] or [-2^(b-1), 2^(b-1) - 1]."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    try:
        slope = float(_get(ds, "RescaleSlope", 1) or 1)
        intercept = float(_get(ds, "RescaleIntercept", 0) or 0)
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
        photometric = _grayscale_photometric(ds)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:  # load_slices splits multi-frame files
            raise ConversionError("multi-frame dataset passed whole, not split into frames")
        if "PixelData" not in ds:
            raise ConversionError("no pixel data")
        syntax = transfer_syntax(ds)
        if syntax not in problems:
            problems[syntax] = syntax_problem(syntax)
        problem = problems[syntax]
        if problem:
            raise ConversionError(problem)
        photometrics.add(photometric)
        sizes.add((int(_attr(ds, "Rows")), int(_attr(ds, "Columns"))))
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ConversionError(f"image sizes (rows x columns) differ between slices: {shown}")
    if len(photometrics) > 1:
        raise ConversionError("MONOCHROME1 and MONOCHROME2 slices mixed in one unit")
    return photometrics.pop()


def _grayscale_photometric(ds: pydicom.Dataset) -> str:
    """PhotometricInterpretation of a grayscale image; ConversionError for colour."""
    photometric = str(_get(ds, "PhotometricInterpretation", "")).strip().upper()
    samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
    if photometric not in _GRAYSCALE or samples != 1:
        raise ConversionError(
            f"colour image (PhotometricInterpretation {photometric or 'missing'}) "
            "in a grayscale study"
        )
    return photometric


def _native_dtype(ds: pydicom.Dataset, syntax: str) -> np.dtype | None:
    """The array type of uncompressed single-sample pixel data of 8, 16 or 32 bits
    allocated, as pydicom decodes it; None for anything else."""
    try:
        bits = int(_attr(ds, "BitsAllocated"))
        signed = int(_attr(ds, "PixelRepresentation")) == 1
        samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or bits not in (8, 16, 32):
        return None
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    return np.dtype(f"{order}{'i' if signed else 'u'}{bits // 8}")


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Uncompressed pixel data of a single-frame dataset, taken from the dataset or, when
    deferred, read from the offset its header recorded: what pydicom's native decoder
    does, without its per-call set-up (which dominates for small images) and without
    loading the value into `ds`. None when not applicable or the data are short."""
    syntax = transfer_syntax(ds)
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    dtype = _native_dtype(ds, syntax) if syntax in _NATIVE_SYNTAXES else None
    if dtype is None or element is None:
        return None
    rows, cols = int(_attr(ds, "Rows")), int(_attr(ds, "Columns"))
    size = rows * cols * dtype.itemsize
    value = element.value
    length = len(value) if isinstance(value, bytes) else getattr(element, "length", 0)
    if not 0 < size <= length < 0xFFFFFFFF:
        return None
    if value is None:  # deferred: read it where the header found it
        filename = getattr(ds, "filename", None)
        if not isinstance(filename, str):
            return None
        with open(filename, "rb") as fh:
            fh.seek(element.value_tell)
            data = fh.read(size)
    else:
        data = value
    if len(data) < size:
        return None
    pixels = np.frombuffer(data, dtype, count=size // dtype.itemsize)
    pixels = pixels.reshape(rows, -1).astype(dtype.newbyteorder("="))
    # Bits above BitsStored are undefined (old overlays live there) and a signed value's
    # sign bit is bit BitsStored - 1: mask or sign-extend, as pydicom's decoder does.
    unused = dtype.itemsize * 8 - int(_get(ds, "BitsStored") or dtype.itemsize * 8)
    if 0 < unused < dtype.itemsize * 8:
        if dtype.kind == "i":
            pixels = (pixels << unused) >> unused  # arithmetic shift keeps the sign
        else:
            pixels &= (1 << (dtype.itemsize * 8 - unused)) - 1
    return pixels


def slice_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values (rows, columns) of one slice: a single-frame dataset, or one
    frame of a multi-frame file (`FrameView`). The only place pixel data are decoded:
    uncompressed single-frame data directly (`_native_pixels`), the rest by the pinned
    decoder."""
    try:
        if isinstance(ds, FrameView):
            return decode_pixels(ds.source, index=ds.frame)
        native = _native_pixels(ds)
        return native if native is not None else decode_pixels(ds)
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
        bits, signed = int(_attr(ds, "BitsStored")), int(_attr(ds, "PixelRepresentation")) == 1
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
    rows, cols = int(_attr(datasets[0], "Rows")), int(_attr(datasets[0], "Columns"))
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


def _short_error(exc: BaseException, secrets: Sequence[str]) -> str:
    """Type and first message line of an unexpected error, with paths removed."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    for text in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(text, "<file>")
    return (f"{type(exc).__name__}: {message}" if message else type(exc).__name__)[:160]


def _fmt(values: Sequence[float]) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


def convert_unit(
    series_pid: str,
    modality: str,
    paths: Sequence[str],
    dicom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    compression_level: int = 6,
    frames: Sequence[str] | None = None,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
    threads: int = 1,
) -> dict[str, Any]:
    """Convert one image unit; never raises for a bad unit.

    Inputs: the unit's pseudonym and modality, its files (relative to `dicom_root`) and,
    per file, the frames that belong to it (`conventions.FRAMES` text; None or "" = all);
    `uneven_spacing` and `gantry_tilt` as in `volume_geometry`; `threads` compress the
    NIfTI (the bytes do not depend on them). Memory: the headers, the output volume and
    one decoded slice at a time.
    Outputs: `<out_dir>/<series_pid>.nii.gz` and `.json`, written atomically (stale ones
    removed if the unit fails). Returns its manifest row (MANIFEST_COLUMNS).
    """
    out = Path(out_dir)
    nifti_path = out / f"{series_pid}{C.NIFTI_SUFFIX}"
    sidecar_path = out / f"{series_pid}{C.SIDECAR_SUFFIX}"
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row[C.SERIES_PID] = series_pid
    frames = list(frames) if frames is not None else [""] * len(paths)
    try:
        with quiet_pydicom():
            datasets = load_slices(list(zip(paths, frames, strict=True)), dicom_root)
            projection = modality in C.PROJECTION_MODALITIES
            if projection and len(datasets) != 1:
                raise ConversionError(f"projection unit with {len(datasets)} slices (expected 1)")
            photometric = _check_pixels(datasets)
            geometry = (
                projection_geometry(datasets[0])
                if projection
                else volume_geometry(
                    datasets, uneven_spacing=uneven_spacing, gantry_tilt=gantry_tilt
                )
            )
            ordered = [datasets[i] for i in geometry.order]
            volume, notes = build_volume(ordered, photometric)
            if geometry.resampling is not None:
                volume = resample(volume, geometry.resampling)
        shape = (volume.shape[2], volume.shape[1], volume.shape[0])
        ndim = 2 if volume.shape[0] == 1 else 3
        sidecar = sidecar_fields(ordered[0])
        sidecar.update(
            {
                "series_pid": series_pid,
                "n_files": len(paths),
                "n_slices_read": len(datasets),
                "multi_frame": any(isinstance(ds, FrameView) for ds in datasets),
                "radflow_version": radflow_version(),
                "ndim": ndim,
                "shape": list(shape),
                "spacing_mm": [round(v, 6) for v in geometry.spacing],
                "dtype": str(volume.dtype),
                **geometry.notes,
                **notes,
            }
        )
        write_nifti(nifti_path, volume, geometry.affine, compression_level, threads)
        write_bytes_atomic(
            sidecar_path, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
        )
        row.update(
            {
                C.STATUS: C.STATUS_OK,
                "ndim": ndim,
                "shape": _fmt(shape),
                "spacing_mm": _fmt(geometry.spacing),
                "dtype": str(volume.dtype),
            }
        )
    except Exception as exc:  # one bad unit must not stop the shard
        if isinstance(exc, ConversionError):
            reason = str(exc)
        else:
            roots = [os.path.realpath(dicom_root), os.path.abspath(dicom_root), str(dicom_root)]
            reason = _short_error(exc, [*roots, *paths, *map(os.path.basename, paths)])
        row.update({C.STATUS: C.STATUS_FAILED, C.REASON: reason})
        for stale in (nifti_path, sidecar_path):
            stale.unlink(missing_ok=True)
    return row


def _convert_job(args: tuple) -> dict[str, Any]:
    return convert_unit(*args)


def plan_workers(n_units: int, threads: int) -> tuple[int, int]:
    """How a shard uses `threads` cores: (processes, compression threads per unit).

    Many units run in parallel processes with one thread each; fewer units than threads
    share the threads out (one big unit compresses with all of them), so at most `threads`
    threads ever compress at once.
    """
    threads = max(1, int(threads))
    processes = max(1, min(threads, n_units))
    return processes, max(1, threads // processes)


def convert_shard(
    shard_files_tsv: str | os.PathLike,
    dicom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threads: int = 1,
    compression_level: int = 6,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
    progress: bool = True,
) -> pd.DataFrame:
    """Convert every unit listed in a private shard table (series_pid, modality, path,
    frames; see `radflow.dicom.index.read_shard_files`).

    Outputs in `out_dir`: `<series_pid>.nii.gz` + `<series_pid>.json` per converted unit,
    and `manifest.tsv` with columns series_pid, status (ok/failed), reason, ndim (2 for a
    single slice, else 3), shape (x\\y\\z voxels as stored in the NIfTI), spacing_mm
    (x\\y\\z) and dtype, one row per unit sorted by series_pid. `threads` cores are used
    as `plan_workers` says (units with the most files start first); a failed unit is
    listed with its reason and the others still convert. The files do not depend on
    `threads`. Outputs of units no longer in the table are not deleted: consumers go by the manifest.
    `uneven_spacing` and `gantry_tilt` are the convert.* settings (see `volume_geometry`).
    Returns the manifest.
    """
    table = read_shard_files(shard_files_tsv)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = sorted(table.groupby(C.SERIES_PID, sort=True), key=lambda g: -len(g[1]))
    processes, unit_threads = plan_workers(len(groups), threads)
    jobs = []
    for series_pid, group in groups:
        files = sorted(zip(group[C.PATH], group[C.FRAMES], strict=True))
        paths, frames = [f[0] for f in files], [f[1] for f in files]
        jobs.append((series_pid, group[C.MODALITY].iloc[0], paths, str(dicom_root), str(out),
                     compression_level, frames, uneven_spacing, gantry_tilt,
                     unit_threads))  # fmt: skip
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(jobs), desc="convert", unit="unit", file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        if processes == 1:
            for job in jobs:
                rows.append(_convert_job(job))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=processes) as pool:
                futures = {pool.submit(_convert_job, job): job for job in jobs}
                for future in as_completed(futures):
                    try:
                        rows.append(future.result())
                    except Exception as exc:  # a worker died (e.g. killed for memory)
                        row = dict.fromkeys(MANIFEST_COLUMNS, "")
                        row.update({C.SERIES_PID: futures[future][0], C.STATUS: C.STATUS_FAILED,
                                    C.REASON: f"worker process failed ({type(exc).__name__})"})  # fmt: skip
                        rows.append(row)
                    bar.update(1)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    write_tsv(manifest, out / C.MANIFEST)
    return manifest
