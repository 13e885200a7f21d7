"""Voxel geometry of the volumes layout: one case's way from its converted NIfTI into the
preprocessed space and back.

Three steps map a converted image (nibabel's voxel order (i, j, k), RAS affine) onto its
preprocessed array (radflow's order (z, y, x) = (inferior->superior,
posterior->anterior, left->right) of the closest canonical axes):

1. reorientation to the closest RAS axes: a permutation and flips of the voxel axes, no
   interpolation (nibabel's `io_orientation`); an oblique image stays oblique in world
   space, its array axes just mean the same anatomy as every other case's;
2. a crop: the box [crop_start, crop_stop) of the reoriented voxels;
3. resampling of that box onto `resampled_shape` voxels, edge-aligned (the box's outer
   faces stay where they are, as nnU-Net's resize does): preprocessed index p maps to
   reoriented index q = crop_start + (p + 0.5) * scale - 0.5 with scale = box size /
   resampled_shape per axis. The resampled spacing is the box extent over the
   resampled shape: within half a voxel per image of the target spacing.

`CaseGeometry` holds exactly what the steps need (one row of a volumes manifest),
`restore_native` runs them backwards on a prediction, and `world_to_preprocessed` /
`preprocessed_to_world` carry world coordinates (mm, RAS or LPS) into the preprocessed
voxel space and out of it. Everything here is a pure function of arrays and a geometry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_lib
from scipy import ndimage

#: Orientation of nibabel's RAS+ axes (x: left->right, y: posterior->anterior,
#: z: inferior->superior), the reoriented images' voxel axes (i, j, k).
RAS_ORNT = ornt_lib.axcodes2ornt("RAS")
#: World frames of coordinates: NIfTI's RAS+ or ITK/DICOM's LPS+ (x and y negated).
FRAMES = ("RAS", "LPS")
_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


# -------------------------------------------------------------------- reorientation
def reorient_to_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`volume` (i, j, k[, channels...]) as nibabel reads it, on the closest canonical
    axes in radflow's order: (z, y, x) for a 3D volume, (channels, z, y, x) for a 4D one.
    Only permutes and flips (a view where possible)."""
    canonical = ornt_lib.apply_orientation(volume, ornt_lib.io_orientation(affine))
    spatial = (2, 1, 0)
    return canonical.transpose(*reversed(range(3, canonical.ndim)), *spatial)


def reorient_to_native(volume_zyx: np.ndarray, axcodes: str) -> np.ndarray:
    """The inverse of `reorient_to_canonical` for a 3D volume: (z, y, x) on the closest
    canonical axes back to the voxel order (i, j, k) of an image whose axes had
    orientation `axcodes` (e.g. "LPS")."""
    to_native = ornt_lib.ornt_transform(RAS_ORNT, ornt_lib.axcodes2ornt(tuple(axcodes)))
    return ornt_lib.apply_orientation(volume_zyx.transpose(2, 1, 0), to_native)


def axcodes_of(affine: np.ndarray) -> str:
    """The closest axis codes of an affine's voxel axes, e.g. "LPS" or "PSR"."""
    return "".join(ornt_lib.ornt2axcodes(ornt_lib.io_orientation(affine)))


def canonical_spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) along the reoriented axes (z, y, x): the lengths of the
    affine's columns, permuted (oblique images included)."""
    lengths = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    ornt = ornt_lib.io_orientation(affine)
    by_ras_axis = np.empty(3)
    by_ras_axis[ornt[:, 0].astype(int)] = lengths
    return tuple(float(v) for v in by_ras_axis[::-1])


def canonical_shape(native_shape: Iterable[int], affine: np.ndarray) -> tuple[int, int, int]:
    """Shape (z, y, x) of a volume of `native_shape` (i, j, k) once reoriented."""
    ornt = ornt_lib.io_orientation(affine)
    by_ras_axis = [0, 0, 0]
    for size, ras_axis in zip(list(native_shape)[:3], ornt[:, 0].astype(int), strict=True):
        by_ras_axis[ras_axis] = int(size)
    return tuple(by_ras_axis[::-1])


# ----------------------------------------------------------------------- resampling
def grid_transform(in_shape, out_shape) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) of the edge-aligned map from an output grid of `out_shape` onto an
    input grid of `in_shape`: input index = output index * scale + offset."""
    scale = np.asarray(in_shape, float) / np.asarray(out_shape, float)
    return scale, 0.5 * scale - 0.5


def resample_image(volume: np.ndarray, out_shape, *, order: int = 1) -> np.ndarray:
    """`volume` (z, y, x) resampled onto `out_shape` voxels covering the same extent
    (edge-aligned), float32. order 1: linear, 3: cubic B-spline. Where an axis is
    downsampled by s, a Gaussian prefilter of sigma (s - 1) / 2 input voxels removes
    what the coarser grid cannot represent (as skimage's resize with anti_aliasing), so
    small bright structures average down instead of aliasing. An unchanged shape
    returns the values unchanged."""
    volume = np.asarray(volume, np.float32)
    if tuple(out_shape) == volume.shape:
        return volume.copy()
    scale, offset = grid_transform(volume.shape, out_shape)
    sigma = np.where(scale > 1, (scale - 1) / 2, 0.0)
    if sigma.any():
        volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    return ndimage.affine_transform(volume, scale, offset=offset, output_shape=tuple(out_shape),
                                    order=order, mode="nearest", output=np.float32)  # fmt: skip


def _argmax_of_resampled(class_maps: Iterable[tuple[int, np.ndarray]], in_shape, out_shape,
                         dtype) -> np.ndarray:  # fmt: skip
    """Label map of the class whose map, resampled linearly onto `out_shape`, is highest
    (ties: the class given first). One class map in memory at a time."""
    scale, offset = grid_transform(in_shape, out_shape)
    best = np.full(tuple(out_shape), -np.inf, np.float32)
    labels = np.zeros(tuple(out_shape), dtype)
    resampled = np.empty(tuple(out_shape), np.float32)
    for label, class_map in class_maps:
        ndimage.affine_transform(np.asarray(class_map, np.float32), scale, offset=offset,
                                 output_shape=tuple(out_shape), order=1, mode="nearest",
                                 output=resampled)  # fmt: skip
        higher = resampled > best
        best[higher] = resampled[higher]
        labels[higher] = label
    return labels


def bounding_box(
    region: np.ndarray, margin_vox: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) per axis of the box around `region`'s True voxels, widened by
    `margin_vox` and clipped to the volume; the whole volume where `region` is empty."""
    if not region.any():
        return (0,) * region.ndim, tuple(region.shape)
    start, stop = [], []
    for axis in range(region.ndim):
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        start.append(max(0, int(hit[0]) - margin_vox[axis]))
        stop.append(min(region.shape[axis], int(hit[-1]) + 1 + margin_vox[axis]))
    return tuple(start), tuple(stop)


LABEL_METHODS = ("linear", "nearest")


def resample_labels(labels: np.ndarray, out_shape, *, method: str = "linear") -> np.ndarray:
    """A label map (z, y, x) resampled onto `out_shape` voxels (edge-aligned), its dtype
    kept. "linear": each label's one-hot map resampled linearly, the highest wins, ties
    to the lower label (nnU-Net's way: boundaries move smoothly, no label is invented);
    "nearest": the nearest voxel's label (coarse, blocky when upsampling). An unchanged
    shape returns the labels unchanged.

    Linear interpolation of one-hot maps sums to 1 everywhere, so background is 1 minus
    the other labels' sum and each foreground label is resampled only around its own
    bounding box: a small tumour in a large volume costs little."""
    labels = np.asarray(labels)
    out_shape = tuple(int(n) for n in out_shape)
    if out_shape == labels.shape:
        return labels.copy()
    scale, offset = grid_transform(labels.shape, out_shape)
    if method == "nearest":
        return ndimage.affine_transform(labels, scale, offset=offset, output_shape=out_shape,
                                        order=0, mode="nearest")  # fmt: skip
    if method != "linear":
        raise ValueError(f"label resampling {method!r} is not one of {', '.join(LABEL_METHODS)}")
    best = np.zeros(out_shape, np.float32)  # the highest foreground value so far
    total = np.zeros(out_shape, np.float32)  # every foreground label's value: 1 - background's
    out = np.zeros(out_shape, labels.dtype)
    for value in np.unique(labels):
        if value == 0:
            continue
        one_hot = labels == value
        lo_in, hi_in = bounding_box(one_hot, (1, 1, 1))  # the voxels that can weigh in
        # output voxels whose input coordinate falls inside that box
        lo = [max(0, int(np.floor((a - offset[k]) / scale[k]))) for k, a in enumerate(lo_in)]
        hi = [min(out_shape[k], int(np.ceil((b - 1 - offset[k]) / scale[k])) + 1)
              for k, b in enumerate(hi_in)]  # fmt: skip
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        source = one_hot[tuple(slice(a, b) for a, b in zip(lo_in, hi_in, strict=True))]
        weight = ndimage.affine_transform(
            source.astype(np.float32), scale, offset=offset + np.multiply(lo, scale) - lo_in,
            output_shape=tuple(b - a for a, b in zip(lo, hi, strict=True)), order=1,
            mode="nearest",
        )  # fmt: skip
        higher = weight > best[region]
        best[region][higher] = weight[higher]
        out[region][higher] = value
        total[region] += weight
    out[1.0 - total >= best] = 0
    return out


# ------------------------------------------------------------------------- geometry
@dataclass(frozen=True, eq=False)
class CaseGeometry:
    """Where one case's preprocessed voxels lie: the converted image's grid
    (`native_shape` (i, j, k) and RAS `native_affine`), the crop box in reoriented voxels
    (z, y, x; start inclusive, stop exclusive) and the preprocessed array's shape."""

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]

    @cached_property
    def axcodes(self) -> str:
        """The converted image's closest axis codes: with `native_shape` they fix the
        reorientation (permutation and flips)."""
        return axcodes_of(self.native_affine)

    @cached_property
    def canonical_affine(self) -> np.ndarray:
        """RAS affine of the reoriented voxels (i, j, k) = reversed (z, y, x)."""
        ornt = ornt_lib.io_orientation(self.native_affine)
        return self.native_affine @ ornt_lib.inv_ornt_aff(ornt, self.native_shape)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return canonical_shape(self.native_shape, self.native_affine)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Spacing of the reoriented voxels (z, y, x)."""
        return canonical_spacing_mm(self.native_affine)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    @property
    def scale(self) -> np.ndarray:
        """Reoriented voxels per preprocessed voxel, (z, y, x)."""
        return grid_transform(self.crop_shape, self.resampled_shape)[0]

    @property
    def resampled_spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.asarray(self.spacing_mm) * self.scale)

    @property
    def preprocessed_affine(self) -> np.ndarray:
        """NIfTI (RAS) affine of the preprocessed arrays: `write_nifti(path, array[c],
        affine)` (radflow.dicom.nifti) writes a volume that overlays the converted image
        in any viewer."""
        scale = self.scale[::-1]
        to_canonical = np.eye(4)
        to_canonical[:3, :3] = np.diag(scale)
        to_canonical[:3, 3] = np.asarray(self.crop_start[::-1], float) + 0.5 * scale - 0.5
        return self.canonical_affine @ to_canonical

    # ---- one manifest row
    def to_row(self) -> dict[str, str]:
        """The manifest columns of this geometry (values joined by backslashes, like the
        convert manifest's shape; affines row by row, at full precision)."""
        return {
            "native_shape": _join(self.native_shape),
            "native_affine": "\\".join(repr(float(v)) for v in np.ravel(self.native_affine)),
            "native_axcodes": self.axcodes,
            "canonical_shape": _join(self.canonical_shape),
            "canonical_spacing_mm": _join(self.spacing_mm, "{:.6g}"),
            "crop_start": _join(self.crop_start),
            "crop_stop": _join(self.crop_stop),
            "resampled_shape": _join(self.resampled_shape),
            "resampled_spacing_mm": _join(self.resampled_spacing_mm, "{:.6g}"),
            "preprocessed_affine": "\\".join(
                repr(float(v)) for v in np.ravel(self.preprocessed_affine)
            ),
        }

    @classmethod
    def from_row(cls, row: Mapping | CaseGeometry) -> CaseGeometry:
        """The geometry recorded in a volumes manifest row (a dict or pandas row); a
        CaseGeometry is returned as it is."""
        if isinstance(row, CaseGeometry):
            return row
        affine = np.array(_split(row["native_affine"], float)).reshape(4, 4)
        geometry = cls(_split(row["native_shape"], int), affine, _split(row["crop_start"], int),
                       _split(row["crop_stop"], int), _split(row["resampled_shape"], int))  # fmt: skip
        recorded = row.get("native_axcodes") if hasattr(row, "get") else None
        if recorded and recorded != geometry.axcodes:
            raise ValueError(f"manifest row: axis codes {recorded} but its affine gives "
                             f"{geometry.axcodes}")  # fmt: skip
        return geometry


def _join(values, fmt: str = "{}") -> str:
    return "\\".join(fmt.format(v) for v in values)


def _split(text, kind) -> tuple:
    return tuple(kind(float(v)) if kind is int else kind(v) for v in str(text).split("\\"))


# ------------------------------------------------------------ world coordinates
def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame {frame!r} is not one of {', '.join(FRAMES)}")


def preprocessed_to_world(
    points_zyx, geometry: Mapping | CaseGeometry, *, frame: str
) -> np.ndarray:
    """World coordinates (mm; `frame` "RAS" as NIfTI, or "LPS" as ITK, DICOM and LUNA16)
    of points (N, 3) given as preprocessed array indices (z, y, x), fractional allowed."""
    _check_frame(frame)
    affine = CaseGeometry.from_row(geometry).preprocessed_affine
    points = np.atleast_2d(np.asarray(points_zyx, float))
    world = points[:, ::-1] @ affine[:3, :3].T + affine[:3, 3]
    return world * _LPS_FLIP if frame == "LPS" else world


def world_to_preprocessed(points_mm, geometry: Mapping | CaseGeometry, *, frame: str) -> np.ndarray:
    """Preprocessed array indices (z, y, x), fractional, of world points (N, 3) in mm
    (`frame` "RAS" or "LPS", see `preprocessed_to_world`, of which this is the inverse)."""
    _check_frame(frame)
    affine = CaseGeometry.from_row(geometry).preprocessed_affine
    points = np.atleast_2d(np.asarray(points_mm, float))
    if frame == "LPS":
        points = points * _LPS_FLIP
    ijk = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return ijk[:, ::-1]


# --------------------------------------------------------------------- the inverse
def restore_native(prediction: np.ndarray, geometry: Mapping | CaseGeometry, *,
                   label_method: str = "linear") -> np.ndarray:  # fmt: skip
    """A prediction in preprocessed space, back on the converted image's voxel grid.

    `prediction`: a label map (z, y, x) of integers, or per-class probabilities
    (K, z, y, x) (class k is label k) on the preprocessed grid of `geometry` (a
    CaseGeometry or a volumes manifest row). Probabilities are resampled linearly per
    class and the most probable class taken (best: no information is lost before the
    decision); a label map with `label_method` ("linear": one-hot, linear, argmax;
    "nearest"). The box is then padded with background (0) to the reoriented image and
    the reorientation undone. Returns labels (i, j, k) in the converted image's exact
    voxel grid as nibabel reads it (np.asarray(nib.load(path).dataobj)): write them with
    `write_label_nifti`, and they overlay the converted image exactly.
    """
    geometry = CaseGeometry.from_row(geometry)
    prediction = np.asarray(prediction)
    spatial = tuple(prediction.shape[-3:])
    if spatial != tuple(geometry.resampled_shape) or prediction.ndim not in (3, 4):
        raise ValueError(f"prediction of shape {prediction.shape}: the preprocessed grid is "
                         f"{tuple(geometry.resampled_shape)} (z, y, x), with classes first "
                         "for probabilities")  # fmt: skip
    box = geometry.crop_shape
    if prediction.ndim == 4:
        dtype = np.uint8 if len(prediction) <= 256 else np.uint16
        if spatial == box:
            labels = np.argmax(prediction, axis=0).astype(dtype)
        else:
            labels = _argmax_of_resampled(enumerate(prediction), spatial, box, dtype)
    else:
        if not np.issubdtype(prediction.dtype, np.integer):
            raise ValueError(f"a label map must hold integers, not {prediction.dtype}; give "
                             "probabilities as (classes, z, y, x)")  # fmt: skip
        labels = resample_labels(prediction, box, method=label_method)
    canonical = np.zeros(geometry.canonical_shape, labels.dtype)
    canonical[tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop,
                                                  strict=True))] = labels  # fmt: skip
    return np.ascontiguousarray(reorient_to_native(canonical, geometry.axcodes))


def write_label_nifti(path: str | os.PathLike, labels_ijk: np.ndarray,
                      geometry: Mapping | CaseGeometry, *, compression_level: int = 6) -> Path:  # fmt: skip
    """Write a label map on the converted image's grid (`restore_native`'s output,
    (i, j, k)) as gzipped NIfTI-1 with the converted image's affine, atomically (radflow's
    NIfTI writer): uint8 up to label 255, else uint16."""
    from radflow.dicom.nifti import write_nifti

    geometry = CaseGeometry.from_row(geometry)
    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.shape != tuple(geometry.native_shape):
        raise ValueError(f"labels of shape {labels_ijk.shape}: the converted image is "
                         f"{tuple(geometry.native_shape)} (i, j, k)")  # fmt: skip
    dtype = np.uint8 if labels_ijk.max(initial=0) < 256 else np.uint16
    return write_nifti(path, labels_ijk.astype(dtype).T, geometry.native_affine, compression_level)


def read_nifti_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(native_shape (i, j, k), RAS affine) of a NIfTI file, from its header only."""
    image = nib.load(os.fspath(path))
    return tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, float)
