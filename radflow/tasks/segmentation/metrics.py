"""Segmentation metrics of label maps on an anisotropic voxel grid, in numpy and scipy.

In the style of ``sklearn.metrics`` and ``radflow.metrics``: pure functions of arrays that
return numbers; no I/O, no plotting, no global state. A mask is an array whose nonzero
voxels are foreground; prediction and reference share one shape. ``spacing_mm`` is the
voxel size in millimetres per array axis, in array axis order (for an array from
SimpleITK's ``GetArrayFromImage``, ``image.GetSpacing()[::-1]``; for nibabel's
``get_fdata()``, ``header.get_zooms()[:3]``).

Definitions
-----------
- Dice: 2 |P & R| / (|P| + |R|), a fraction in [0, 1].
- Boundary of a mask: its voxels with a face neighbour (6 in 3D) outside the mask, beyond
  the array edge counting as outside: ``mask & ~binary_erosion(mask)`` with the cross
  element. This is MONAI's ``get_mask_edges`` without subvoxels, behind its Hausdorff and
  surface-Dice metrics (DeepMind's ``surface-distance`` weights surfels by area instead).
- Surface distances: from each boundary voxel of one mask to the nearest boundary voxel
  of the other, Euclidean between voxel centres in mm (so a boundary voxel inside the
  other mask is not at 0). Exact nearest-neighbour queries in a k-d tree of boundary voxels
  scaled by ``spacing_mm`` (MONAI's CPU method), equal to ``distance_transform_edt(
  ~boundary, sampling=spacing_mm)`` at those voxels (tested); the tree's cost follows the
  boundary, the transform's the bounding box, which stray false positives stretch to
  the whole image (whole tumour of a 240 x 240 x 155 case: 1.0 s in all, not 5.9 s).
- HD95: the larger of the two directed 95th percentiles (numpy's linear interpolation),
  as MONAI's ``HausdorffDistanceMetric(percentile=95)`` and Metrics Reloaded; not the
  percentile of the pooled distances. In mm.
- NSD at tolerance tau (mm): the fraction of the boundary voxels of both masks within tau
  (inclusive) of the other boundary, voxels counted, not areas (MONAI's
  ``SurfaceDiceMetric``, ``use_subvoxels=False``; Metrics Reloaded). In [0, 1].
- Volume: voxel count times voxel volume in mL (1 mL = 1000 mm^3); errors are prediction
  minus reference, absolute in mL and relative as a signed fraction of the reference.
- Lesions: connected components (26-connectivity in 3D by default, or 6 or 18) of each
  mask, those under ``min_lesion_mm3`` dropped from both. Metrics Reloaded's rule
  (``lesion_wise_tp_fp_fn``, from ATLAS/ISLES): a reference lesion sharing at least one
  voxel with a predicted lesion is a TP, otherwise a FN; a predicted lesion sharing no
  voxel with any reference lesion is a FP. A reference lesion predicted in two pieces is
  1 TP and no FP; one predicted blob over two reference lesions is 2 TP (merges are
  forgiven). F1 = 2 TP / (2 TP + FP + FN), precision TP / (TP + FP), recall TP / (TP + FN).

Empty masks (Metrics Reloaded, Maier-Hein et al. 2024; BraTS)
-------------------------------------------------------------
- Both empty: Dice 1, NSD 1, HD95 0 mm, lesion F1 1; volume errors 0, relative NaN;
  lesion precision and recall NaN (zero denominator, as in ``radflow.metrics``; Metrics
  Reloaded says 1).
- One empty: Dice 0, NSD 0, lesion F1 0, and HD95 = ``hd95_one_empty_mm``: by default
  the image diagonal |shape * spacing| in mm, the worst value the image allows (BraTS's
  fixed 373.13 mm is this for 240 x 240 x 155 at 1 mm). NaN marks it undefined instead:
  ``bootstrap_mean_ci`` then averages the defined cases and counts the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.spatial import KDTree

from radflow.metrics import bootstrap_case_ci

__all__ = [
    "BRATS_2015_REGIONS",
    "LesionCounts",
    "MeanCI",
    "RegionMetrics",
    "SegmentationMetricSettings",
    "bootstrap_mean_ci",
    "dice",
    "hausdorff_distance_mm",
    "image_diagonal_mm",
    "lesion_detection",
    "normalised_surface_dice",
    "region_metrics",
    "surface_distances_mm",
    "volume_ml",
]

# BraTS 2013-2015 labels: 0 background, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing.
BRATS_2015_REGIONS: dict[str, tuple[int, ...]] = {
    "whole_tumour": (1, 2, 3, 4),
    "tumour_core": (1, 3, 4),
    "enhancing_tumour": (4,),
}

MM3_PER_ML = 1000.0

Distances = NDArray[np.float64]


# ------------------------------------------------------------------ validation
def _spacing(spacing_mm: ArrayLike, ndim: int) -> NDArray[np.float64]:
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_mm must be {ndim} positive numbers, got {spacing_mm!r}")
    return spacing


def _masks(pred: ArrayLike, ref: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    p, r = np.asarray(pred) != 0, np.asarray(ref) != 0
    if p.shape != r.shape:
        raise ValueError(f"prediction has shape {p.shape} but reference has {r.shape}")
    return p, r


def _union_box(p: NDArray[np.bool_], r: NDArray[np.bool_], margin: int = 1):
    """Slices of the bounding box of p | r grown by ``margin`` voxels, or None if empty.

    No metric here changes under this crop: a boundary treats the array edge as outside
    (the margin keeps a layer of background), lesions lie inside, and distances do not
    depend on where the box starts.
    """
    union = p | r
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        if hit.size == 0:
            return None
        box.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, union.shape[axis])))
    return tuple(box)


# ------------------------------------------------------------------ overlap and volume
def dice(pred: ArrayLike, ref: ArrayLike) -> float:
    """Dice coefficient 2 |P & R| / (|P| + |R|) of two masks, in [0, 1]; 1 if both are empty."""
    p, r = _masks(pred, ref)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return 1.0 if total == 0 else float(2 * np.count_nonzero(p & r) / total)


def volume_ml(mask: ArrayLike, spacing_mm: ArrayLike) -> float:
    """Volume of a mask in mL: nonzero voxels times the voxel volume (product of spacing_mm)."""
    m = np.asarray(mask) != 0
    return float(np.count_nonzero(m) * np.prod(_spacing(spacing_mm, m.ndim)) / MM3_PER_ML)


def image_diagonal_mm(shape: Sequence[int], spacing_mm: ArrayLike) -> float:
    """Length in mm of the diagonal of an image grid, |shape * spacing| (373.13 for BraTS)."""
    return float(np.linalg.norm(np.asarray(shape) * _spacing(spacing_mm, len(shape))))


def _one_empty_mm(one_empty_mm: float | None, shape, spacing) -> float:
    return image_diagonal_mm(shape, spacing) if one_empty_mm is None else float(one_empty_mm)


# ------------------------------------------------------------------ surface distances
def _boundary(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _surface_distances(p, r, spacing) -> tuple[Distances, Distances]:
    box = _union_box(p, r)
    if box is None:
        return np.zeros(0), np.zeros(0)
    points_p = np.argwhere(_boundary(p[box])) * spacing
    points_r = np.argwhere(_boundary(r[box])) * spacing
    if points_p.size == 0 or points_r.size == 0:  # one mask is empty
        return np.full(len(points_p), np.inf), np.full(len(points_r), np.inf)
    p_to_r = KDTree(points_r, leafsize=32).query(points_p)[0]
    r_to_p = KDTree(points_p, leafsize=32).query(points_r)[0]
    return p_to_r, r_to_p


def surface_distances_mm(
    pred: ArrayLike, ref: ArrayLike, spacing_mm: ArrayLike
) -> tuple[Distances, Distances]:
    """Distances in mm from each boundary voxel of one mask to the other's boundary.

    Returns (pred_to_ref, ref_to_pred): one distance per boundary voxel of the prediction
    and of the reference (boundary as in the module docstring). Distances to an empty
    mask are +inf; an empty mask gives an empty array.
    """
    p, r = _masks(pred, ref)
    return _surface_distances(p, r, _spacing(spacing_mm, p.ndim))


def _hausdorff(d_pr: Distances, d_rp: Distances, percentile: float, one_empty_mm: float) -> float:
    if d_pr.size == 0 and d_rp.size == 0:
        return 0.0
    if d_pr.size == 0 or d_rp.size == 0:
        return one_empty_mm
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def hausdorff_distance_mm(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing_mm: ArrayLike,
    *,
    percentile: float = 95.0,
    one_empty_mm: float | None = None,
) -> float:
    """Percentile Hausdorff distance in mm (HD95 by default; 100 is the Hausdorff distance).

    The larger of the two directed ``percentile``-th percentiles of the surface distances
    (MONAI's convention). Both masks empty: 0. One empty: ``one_empty_mm``, by default the
    image diagonal (``image_diagonal_mm``); NaN marks it undefined.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    p, r = _masks(pred, ref)
    spacing = _spacing(spacing_mm, p.ndim)
    worst_mm = _one_empty_mm(one_empty_mm, p.shape, spacing)
    return _hausdorff(*_surface_distances(p, r, spacing), percentile, worst_mm)


def _nsd(d_pr: Distances, d_rp: Distances, tolerance_mm: float) -> float:
    if not tolerance_mm >= 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    n_boundary = d_pr.size + d_rp.size
    if n_boundary == 0:
        return 1.0
    within = np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)
    return float(within / n_boundary)


def normalised_surface_dice(
    pred: ArrayLike, ref: ArrayLike, spacing_mm: ArrayLike, tolerance_mm: float
) -> float:
    """Normalised surface Dice: fraction of both boundaries within ``tolerance_mm`` (<=) of
    the other, counted in boundary voxels; in [0, 1]. Both empty: 1; one empty: 0."""
    p, r = _masks(pred, ref)
    return _nsd(*_surface_distances(p, r, _spacing(spacing_mm, p.ndim)), tolerance_mm)


# ------------------------------------------------------------------ lesions
@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection counts of one case (matching rule in the module docstring)."""

    n_ref: int  # reference lesions (connected components at or above the minimum size)
    n_pred: int  # predicted lesions
    tp: int  # reference lesions overlapped by a predicted lesion
    fp: int  # predicted lesions overlapping no reference lesion
    fn: int  # reference lesions overlapped by none

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        errors = self.fp + self.fn
        return 2 * self.tp / (2 * self.tp + errors) if self.tp + errors else 1.0


def _structure(ndim: int, connectivity: int) -> NDArray[np.bool_]:
    """Structuring element whose centre has ``connectivity`` neighbours (6/18/26 in 3D)."""
    for rank in range(1, ndim + 1):
        structure = ndimage.generate_binary_structure(ndim, rank)
        if structure.sum() - 1 == connectivity:
            return structure
    raise ValueError(f"connectivity {connectivity} is not a neighbourhood size in {ndim}-D")


def _components(mask, structure, min_voxels: float) -> tuple[NDArray[np.int32], int]:
    labels, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    relabel = np.cumsum(keep) * keep  # kept components renumbered 1..k, the others 0
    return relabel[labels], int(keep.sum())


def _lesion_counts(p, r, spacing, connectivity: int, min_lesion_mm3: float) -> LesionCounts:
    structure = _structure(p.ndim, connectivity)
    box = _union_box(p, r)
    if box is None:
        return LesionCounts(0, 0, 0, 0, 0)
    min_voxels = min_lesion_mm3 / float(np.prod(spacing))
    ref_labels, n_ref = _components(r[box], structure, min_voxels)
    pred_labels, n_pred = _components(p[box], structure, min_voxels)
    shared = (ref_labels > 0) & (pred_labels > 0)
    tp = np.unique(ref_labels[shared]).size
    fp = n_pred - np.unique(pred_labels[shared]).size
    return LesionCounts(n_ref=n_ref, n_pred=n_pred, tp=tp, fp=fp, fn=n_ref - tp)


def lesion_detection(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing_mm: ArrayLike,
    *,
    connectivity: int = 26,
    min_lesion_mm3: float = 0.0,
) -> LesionCounts:
    """Lesion-wise TP/FP/FN of two masks (rule in the module docstring).

    ``connectivity``: neighbours that join voxels into one lesion (6, 18 or 26 in 3D; 4 or
    8 in 2D). ``min_lesion_mm3``: components of either mask smaller than this volume are
    ignored. Precision, recall and F1 are properties of the result.
    """
    p, r = _masks(pred, ref)
    return _lesion_counts(p, r, _spacing(spacing_mm, p.ndim), connectivity, min_lesion_mm3)


# ------------------------------------------------------------------ per region
@dataclass(frozen=True)
class SegmentationMetricSettings:
    """How ``region_metrics`` measures; the conventions are the module docstring's."""

    nsd_tolerance_mm: float
    lesion_connectivity: int = 26
    min_lesion_mm3: float = 0.0
    hd95_one_empty_mm: float | None = None  # None: the image diagonal; NaN: undefined


@dataclass(frozen=True)
class RegionMetrics:
    """All metrics of one region of one case (``dataclasses.asdict`` gives a table row)."""

    region: str
    dice: float
    hd95_mm: float
    nsd: float
    ref_volume_ml: float
    pred_volume_ml: float
    volume_error_ml: float  # |pred - ref|
    volume_relative_error: float  # (pred - ref) / ref, signed; NaN for an empty reference
    ref_lesions: int
    pred_lesions: int
    lesion_tp: int
    lesion_fp: int
    lesion_fn: int
    lesion_precision: float
    lesion_recall: float
    lesion_f1: float


def _region_row(name, p, r, spacing, settings, one_empty_mm: float) -> RegionMetrics:
    d_pr, d_rp = _surface_distances(p, r, spacing)
    voxel_ml = float(np.prod(spacing)) / MM3_PER_ML
    ref_ml, pred_ml = np.count_nonzero(r) * voxel_ml, np.count_nonzero(p) * voxel_ml
    lesions = _lesion_counts(p, r, spacing, settings.lesion_connectivity, settings.min_lesion_mm3)
    return RegionMetrics(
        region=name,
        dice=dice(p, r),
        hd95_mm=_hausdorff(d_pr, d_rp, 95.0, one_empty_mm),
        nsd=_nsd(d_pr, d_rp, settings.nsd_tolerance_mm),
        ref_volume_ml=ref_ml,
        pred_volume_ml=pred_ml,
        volume_error_ml=abs(pred_ml - ref_ml),
        volume_relative_error=(pred_ml - ref_ml) / ref_ml if ref_ml else float("nan"),
        ref_lesions=lesions.n_ref,
        pred_lesions=lesions.n_pred,
        lesion_tp=lesions.tp,
        lesion_fp=lesions.fp,
        lesion_fn=lesions.fn,
        lesion_precision=lesions.precision,
        lesion_recall=lesions.recall,
        lesion_f1=lesions.f1,
    )


def region_metrics(
    pred_labels: ArrayLike,
    ref_labels: ArrayLike,
    spacing_mm: ArrayLike,
    regions: Mapping[str, Sequence[int]],
    settings: SegmentationMetricSettings,
) -> list[RegionMetrics]:
    """Every metric of every region of one case, one ``RegionMetrics`` per region.

    ``pred_labels`` and ``ref_labels`` are integer label maps of one shape; ``regions``
    maps a region name to the label values it unites (e.g. ``BRATS_2015_REGIONS``; label
    0 is background and may not be part of a region). Rows come in ``regions`` order.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    p_any, r_any = _masks(pred_labels, ref_labels)
    spacing = _spacing(spacing_mm, p_any.ndim)
    one_empty_mm = _one_empty_mm(settings.hd95_one_empty_mm, p_any.shape, spacing)
    # One crop to all foreground serves every region (each region lies inside it).
    box = _union_box(p_any, r_any) or tuple(slice(0, 1) for _ in p_any.shape)
    pred_labels, ref_labels = pred_labels[box], ref_labels[box]
    rows = []
    for name, values in regions.items():
        if 0 in values:
            raise ValueError(f"region {name!r} includes label 0 (background)")
        p, r = np.isin(pred_labels, values), np.isin(ref_labels, values)
        rows.append(_region_row(name, p, r, spacing, settings, one_empty_mm))
    return rows


# ------------------------------------------------------------------ summaries
class MeanCI(NamedTuple):
    """Mean of a per-case metric over the cases where it is defined, with its CI."""

    mean: float
    low: float
    high: float
    n_cases: int
    n_undefined: int  # cases with NaN, left out of the mean (and of each replicate's)


def bootstrap_mean_ci(
    values: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> MeanCI:
    """Mean of one metric over cases with a percentile bootstrap CI (``1 - alpha``).

    ``values`` holds one number per case; NaN marks a case where the metric is undefined
    (e.g. HD95 with one empty mask under ``hd95_one_empty_mm=nan``): it is left out of
    the mean and counted in ``n_undefined``. Cases (or whole ``groups``, e.g. patients)
    are resampled with replacement, as ``radflow.metrics.bootstrap_case_ci``; a replicate
    drawing only undefined cases is skipped. Deterministic for a given seed.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one per case), got shape {v.shape}")
    if np.isinf(v).any():
        raise ValueError("values hold +-inf: use NaN (undefined) or a finite worst value")

    def mean_of_defined(cases: NDArray[np.intp]) -> float:
        drawn = v[cases]
        drawn = drawn[~np.isnan(drawn)]
        return float(drawn.mean()) if drawn.size else float("nan")

    r = bootstrap_case_ci(
        mean_of_defined, v.size, groups=groups, n_boot=n_boot, seed=seed, alpha=alpha
    )
    return MeanCI(r.point, r.low, r.high, int(v.size), int(np.isnan(v).sum()))
