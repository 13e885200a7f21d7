"""Figures of a segmentation evaluation: overlay montages of chosen cases and metric strips.

The conventions are ``radflow.figures``'s (and its helpers are used): the object API on
an Agg canvas (no pyplot), styling scoped with ``rc_context``, the Okabe-Ito palette, one
PNG at ``DPI`` written atomically, and the ``Figure`` returned so tests can inspect it.
Numbers are drawn, never recomputed: the per-case table is ``region_metrics``' rows
(``dataclasses.asdict``) with a ``series_pid`` column, the summary its mean and CI.

Orientation of the montage. Every volume is reoriented (permutes and flips, no
interpolation: nibabel's ``io_orientation``, as ``radflow.geometry``) onto its closest
canonical RAS+ voxel axes (i: left->right, j: posterior->anterior, k:
inferior->superior), whatever the acquisition (axial, sagittal, oblique). Planes are then
shown in the radiological convention: axial and coronal views with the patient's right on
the image's left (seen from the feet / from the front), axial with anterior at the top,
coronal and sagittal with superior at the top, sagittal with anterior on the left. Pixel
aspect follows the voxel spacing, so 1 x 1 x 4 mm voxels are drawn 4 times as tall in
the coronal and sagittal planes. Each panel carries the letters of its left and top edges.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from nibabel import orientations as ornt_lib
from scipy import ndimage

from radflow.conventions import SERIES_PID
from radflow.figures import (
    _STYLE,
    OKABE_ITO,
    _message,
    _new_figure,
    _robust_limits,
    _save,
)
from radflow.geometry import canonical_spacing_mm

__all__ = [
    "METRIC_AXIS_LABELS",
    "MontageCase",
    "display_planes",
    "lesion_centre",
    "load_canonical",
    "plot_metric_strips",
    "plot_overlay_montage",
    "select_cases",
]

#: Axis labels (with units) of the per-case metrics; others fall back to the column name.
METRIC_AXIS_LABELS = {
    "dice": "Dice (fraction)",
    "hd95_mm": "HD95 (mm)",
    "nsd": "surface Dice (fraction)",
    "lesion_f1": "lesion F1 (fraction)",
    "lesion_precision": "lesion precision (fraction)",
    "lesion_recall": "lesion recall (fraction)",
    "volume_error_ml": "absolute volume error (mL)",
    "volume_relative_error": "relative volume error (signed fraction)",
    "ref_volume_ml": "reference volume (mL)",
    "pred_volume_ml": "predicted volume (mL)",
}
#: Metrics of ``RegionMetrics`` where a smaller value is the better case.
LOWER_IS_BETTER = frozenset({"hd95_mm", "volume_error_ml", "lesion_fp", "lesion_fn"})
#: Metrics bounded to [0, 1]: their axis is fixed to that range.
FRACTIONS = frozenset({"dice", "nsd", "lesion_f1", "lesion_precision", "lesion_recall"})

_REFERENCE_COLOUR = OKABE_ITO[4]  # sky blue
_PREDICTION_COLOUR = OKABE_ITO[1]  # orange: apart from sky blue for every common CVD


# ------------------------------------------------------------------ case choice
def select_cases(
    per_case: pd.DataFrame,
    *,
    region: str,
    metric: str = "dice",
    higher_is_better: bool | None = None,
) -> dict[str, str]:
    """The best, median and worst case of ``region`` by ``metric``: {"best": pid,
    "median": pid, "worst": pid}.

    ``per_case``: one row per case and region (columns series_pid, region, the metric).
    Cases with an undefined (NaN) value are left out. ``higher_is_better`` defaults to
    False for ``LOWER_IS_BETTER`` metrics (e.g. hd95_mm), True otherwise. Cases are
    ranked best to worst, ties by ascending series_pid; "best" is the first, "worst" the
    worst value (the smallest series_pid among ties), "median" the lower median of the
    ranking (position (n - 1) // 2). So with fewer than 3 cases entries coincide: one
    case is all three, of two the better is "best" and "median". No defined case:
    ValueError, as is a series_pid listed twice for the region.
    """
    for column in (SERIES_PID, "region", metric):
        if column not in per_case.columns:
            raise ValueError(f"per-case table lacks column {column!r}")
    rows = per_case[per_case["region"] == region]
    repeated = rows[SERIES_PID][rows[SERIES_PID].duplicated()]
    if len(repeated):
        raise ValueError(f"series_pid listed twice for region {region!r}: {repeated.iloc[0]}")
    values = rows[metric].astype(float)
    rows = rows[values.notna()]
    if rows.empty:
        raise ValueError(f"no case with a defined {metric!r} for region {region!r}")
    if higher_is_better is None:
        higher_is_better = metric not in LOWER_IS_BETTER
    sign = -1.0 if higher_is_better else 1.0
    badness = sign * rows[metric].astype(float).to_numpy()
    pids = rows[SERIES_PID].astype(str).to_numpy()
    ranked = sorted(zip(badness, pids, strict=True))  # best first, ties by pid
    worst = min(zip(-badness, pids, strict=True))  # worst value, smallest pid among ties
    return {"best": ranked[0][1], "median": ranked[(len(ranked) - 1) // 2][1], "worst": worst[1]}


# ----------------------------------------------------------------- geometry
def load_canonical(path: str | os.PathLike, *, channel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI's voxels on the closest canonical RAS+ axes (i, j, k), with its affine.

    A 4D image (channels on the 4th axis) gives its ``channel``; only that one is read.
    Permutes and flips only (no interpolation)."""
    image = nib.load(str(path))
    if len(image.shape) == 4:
        if not 0 <= channel < image.shape[3]:
            raise ValueError(f"{path}: channel {channel} of {image.shape[3]} channels")
        data = np.asarray(image.dataobj[..., channel])
    elif len(image.shape) == 3:
        data = np.asarray(image.dataobj)
    else:
        raise ValueError(f"{path}: expected a 3D or 4D image, got shape {image.shape}")
    return ornt_lib.apply_orientation(data, ornt_lib.io_orientation(image.affine)), image.affine


def _largest_component_centre(mask: np.ndarray) -> tuple[int, int, int] | None:
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))  # 26-connected
    if n == 0:
        return None
    sizes = np.bincount(labelled.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1  # the first (lowest label) of equal sizes
    centre = ndimage.center_of_mass(labelled == largest)
    return tuple(int(np.floor(c + 0.5)) for c in centre)  # halves round up


def lesion_centre(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """Voxel (i, j, k) the montage's three planes pass through: the centroid (halves
    rounded up) of the largest 26-connected foreground component (label > 0) of
    ``reference``; if it is empty, of ``prediction``; if both are, the volume centre. A
    connected component's extent along each axis is one unbroken run holding its
    centroid, so each plane through the centre cuts that component (the point itself
    may lie outside it, e.g. for a ring). Ties between equal largest components go to the first in C order."""
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.ndim != 3 or reference.shape != prediction.shape:
        raise ValueError(
            f"reference and prediction must be 3D of one shape, got {reference.shape} "
            f"and {prediction.shape}"
        )
    for labels in (reference, prediction):
        centre = _largest_component_centre(labels > 0)
        if centre is not None:
            return centre
    return tuple(s // 2 for s in reference.shape)


@dataclass(frozen=True)
class Plane:
    """One displayed plane: ``pixels`` (rows, cols) as drawn with origin at the top left,
    ``aspect`` the pixel height over width (mm / mm), the letters of its left and top
    edges, its name and the canonical index of the slice."""

    name: str
    index: int
    pixels: np.ndarray
    aspect: float
    left: str
    top: str


def display_planes(
    volume: np.ndarray, centre: Sequence[int], spacing_ras_mm: Sequence[float]
) -> list[Plane]:
    """Axial, coronal and sagittal planes of a canonical RAS+ ``volume`` (i, j, k) through
    ``centre``, in the radiological display convention of the module docstring.
    ``spacing_ras_mm``: voxel size along i, j, k."""
    i, j, k = (int(c) for c in centre)
    sx, sy, sz = (float(s) for s in spacing_ras_mm)
    # rows top->bottom, cols left->right: flip an axis where the screen runs against it
    axial = volume[::-1, ::-1, k].T  # rows: anterior->posterior, cols: right->left
    coronal = volume[::-1, j, ::-1].T  # rows: superior->inferior, cols: right->left
    sagittal = volume[i, ::-1, ::-1].T  # rows: superior->inferior, cols: anterior->posterior
    return [
        Plane("axial", k, axial, sy / sx, "R", "A"),
        Plane("coronal", j, coronal, sz / sx, "R", "S"),
        Plane("sagittal", i, sagittal, sz / sy, "A", "S"),
    ]


# ------------------------------------------------------------------ montage
@dataclass(frozen=True)
class MontageCase:
    """One row of the montage: its title (e.g. "best: WT Dice 0.93") and NIfTI paths of
    the image (3D, or 4D with channels last) and of reference and prediction label maps
    on the image's voxel grid."""

    title: str
    image: Path
    reference: Path
    prediction: Path


def _window(volume: np.ndarray) -> tuple[float, float]:
    """1st-99th percentile of the nonzero voxels (background zeros would shift it)."""
    values = volume[volume != 0]
    return _robust_limits(values if values.size else volume)


def _load_case(case: MontageCase, channel: int):
    image, affine = load_canonical(case.image, channel=channel)
    masks = []
    for what in ("reference", "prediction"):
        labels, labels_affine = load_canonical(getattr(case, what))
        if labels.shape != image.shape or not np.allclose(labels_affine, affine, atol=1e-3):
            raise ValueError(f"{case.title}: {what} is not on the image's voxel grid")
        masks.append(labels > 0)
    return image, masks[0], masks[1], canonical_spacing_mm(affine)[::-1]


def _outline(ax, mask: np.ndarray, colour: str, style: str) -> None:
    if mask.any() and not mask.all():  # a contour needs both sides of the level
        ax.contour(
            mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.3, linestyles=style
        )


def plot_overlay_montage(
    cases: Sequence[MontageCase],
    out_path: str | os.PathLike,
    *,
    channel: int = 0,
    title: str | None = None,
) -> Figure:
    """One row per case (titled with ``case.title``), three columns: axial, coronal and
    sagittal planes through ``lesion_centre`` of the case, oriented and scaled as the
    module docstring says. Image in grey (1st-99th percentile of its nonzero voxels),
    reference outline solid sky blue, prediction outline dashed orange (foreground:
    label > 0), one legend. ``fig.axes`` are the panels, row by row; an empty ``cases``
    gives one panel saying so."""
    with mpl.rc_context({**_STYLE, "axes.grid": False}):
        fig = _new_figure((9.0, 3.1 * max(1, len(cases)) + 0.6))
        if title:
            fig.suptitle(title)
        if not cases:
            _message(fig.add_subplot(), "no cases to show")
            return _save(fig, out_path)
        rows = np.atleast_1d(fig.subfigures(len(cases), 1))
        for row, case in zip(rows, cases, strict=True):
            image, reference, prediction, spacing = _load_case(case, channel)
            centre = lesion_centre(reference, prediction)
            vmin, vmax = _window(image)
            row.suptitle(case.title, fontsize=10, fontweight="bold")
            masks = (
                display_planes(reference, centre, spacing),
                display_planes(prediction, centre, spacing),
            )
            for ax, plane, ref, pred in zip(
                row.subplots(1, 3), display_planes(image, centre, spacing), *masks, strict=True
            ):
                ax.imshow(
                    plane.pixels,
                    cmap="gray",
                    vmin=vmin,
                    vmax=vmax,
                    aspect=plane.aspect,
                    interpolation="nearest",
                )
                _outline(ax, ref.pixels, _REFERENCE_COLOUR, "solid")
                _outline(ax, pred.pixels, _PREDICTION_COLOUR, "dashed")
                ax.set_xlim(-0.5, plane.pixels.shape[1] - 0.5)
                ax.set_ylim(plane.pixels.shape[0] - 0.5, -0.5)
                ax.set_title(f"{plane.name} (slice {plane.index})", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                for text, xy in ((plane.left, (0.02, 0.5)), (plane.top, (0.5, 0.98))):
                    ax.text(
                        *xy,
                        text,
                        transform=ax.transAxes,
                        color="white",
                        fontsize=8,
                        ha="left" if xy[0] < 0.5 else "center",
                        va="top" if xy[1] > 0.5 else "center",
                    )
        fig.legend(
            handles=[
                Line2D([], [], color=_REFERENCE_COLOUR, lw=1.5, label="reference"),
                Line2D([], [], color=_PREDICTION_COLOUR, lw=1.5, ls="--", label="prediction"),
            ],
            loc="outside lower center",
            ncols=2,
        )
    return _save(fig, out_path)


# ------------------------------------------------------------------- strips
def plot_metric_strips(
    per_case: pd.DataFrame,
    out_path: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("dice", "hd95_mm", "nsd"),
    labels: Mapping[str, str] | None = None,
    summary: pd.DataFrame | None = None,
) -> Figure:
    """One panel per metric (``fig.axes`` in ``metrics`` order), the regions along x in
    the order they first appear in ``per_case``: a point per case (jittered
    horizontally, the same jitter every time), and the mean as a black diamond.

    ``labels``: axis labels by metric, over ``METRIC_AXIS_LABELS``. ``summary``
    (columns region, metric, mean, ci_low, ci_high; e.g. from ``bootstrap_mean_ci``):
    its mean and CI (an error bar) are drawn where it has the region and metric;
    otherwise the mean of the cases, without an interval. Undefined (NaN) values are
    dropped; each tick label says how many cases are left (n).
    """
    lacking = [c for c in ("region", *metrics) if c not in per_case.columns]
    if lacking:
        raise ValueError(f"per-case table lacks column(s) {lacking}")
    axis_labels = {**METRIC_AXIS_LABELS, **(labels or {})}
    regions = list(dict.fromkeys(per_case["region"]))
    stats = {}
    if summary is not None:
        for row in summary.itertuples(index=False):
            stats[(row.region, row.metric)] = (row.mean, row.ci_low, row.ci_high)
    with mpl.rc_context(_STYLE):
        fig = _new_figure((3.4 * max(1, len(metrics)), 3.8))
        axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics)), squeeze=False)).ravel()
        for ax, metric in zip(axes, metrics, strict=False):
            rng = np.random.default_rng(0)  # deterministic jitter, the same in every panel
            ticks = []
            with_ci = False
            for x, region in enumerate(regions):
                values = per_case.loc[per_case["region"] == region, metric].astype(float)
                values = values[values.notna()].to_numpy()
                ticks.append(f"{region}\n(n = {values.size})")
                jitter = rng.uniform(-0.18, 0.18, size=values.size)
                ax.plot(
                    x + jitter,
                    values,
                    ls="none",
                    marker="o",
                    ms=4,
                    alpha=0.6,
                    color=OKABE_ITO[x % (len(OKABE_ITO) - 1)],
                )
                mean, low, high = stats.get((region, metric), (np.nan, np.nan, np.nan))
                if not np.isfinite(mean) and values.size:
                    mean = float(values.mean())
                if not np.isfinite(mean):
                    continue
                if np.isfinite(low) and np.isfinite(high):
                    with_ci = True
                    err = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]]
                    ax.errorbar([x + 0.3], [mean], yerr=err, color="black", capsize=3, lw=1.2)
                ax.plot([x + 0.3], [mean], ls="none", marker="D", ms=6, color="black", zorder=5)
            ax.set_xticks(range(len(regions)), ticks)
            ax.set_xlim(-0.6, len(regions) - 0.2)
            ax.set_ylabel(axis_labels.get(metric, metric))
            if metric in FRACTIONS:
                ax.set_ylim(-0.02, 1.02)
            ax.legend(
                handles=[
                    Line2D([], [], ls="none", marker="o", color="grey", label="case"),
                    Line2D(
                        [],
                        [],
                        marker="D",
                        color="black",
                        label="mean (95% CI)" if with_ci else "mean",
                    ),
                ],
                fontsize=7,
            )
        fig.suptitle("Per-case metrics by region")
    return _save(fig, out_path)
