"""Figures of a localisation evaluation: FROC curves (`radflow.figures.plot_froc`), and
crops around detections.

``radflow.figures``'s conventions (Agg canvas, Okabe-Ito palette, atomic PNG, the
``Figure`` returned). Numbers are drawn, never recomputed: the FROC curves and their
bootstrap bands are the evaluation's (metrics.json), the crops' hits, misses and false
positives its tables (per_nodule.tsv, candidates_scored.tsv).

Crops are cut from the converted image (the NIfTI of the convert stage, in HU for CT,
shown in a lung window) on its closest canonical axes, axial and coronal, in the
radiological convention of ``radflow.tasks.segmentation.figures`` (patient's right on
the image's left), centred on the finding's world position (LPS mm, as LUNA16).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from radflow.figures import _STYLE, OKABE_ITO, _message, _new_figure, _save, plot_froc

CROP_MM = 60.0
LUNG_WINDOW_HU = (-1000.0, 400.0)
PER_KIND = 4


def _canonical(path: str | os.PathLike):
    image = nib.load(str(path))
    ornt = nib.orientations.io_orientation(image.affine)
    image = image.as_reoriented(ornt)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def crop_planes(volume: np.ndarray, affine: np.ndarray, world_lps: Sequence[float],
                crop_mm: float = CROP_MM) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """Axial and coronal crops (radiological display) of `crop_mm` around a world point
    (LPS mm) of a canonical RAS volume with `affine`, and the in-plane mm per pixel."""
    ras = np.asarray(world_lps, float) * np.array([-1.0, -1.0, 1.0])
    i, j, k = np.rint(np.linalg.solve(affine[:3, :3], ras - affine[:3, 3])).astype(int)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    half = [max(1, int(round(crop_mm / 2 / s))) for s in spacing]
    k = int(np.clip(k, 0, volume.shape[2] - 1))
    j_plane = int(np.clip(j, 0, volume.shape[1] - 1))

    def window(axis_len, c, h):
        idx = np.arange(c - h, c + h + 1)
        return idx, (idx >= 0) & (idx < axis_len)

    def take(plane, rows, cols):
        out = np.full((len(rows[0]), len(cols[0])), LUNG_WINDOW_HU[0], np.float32)
        r_ok, c_ok = rows[1], cols[1]
        out[np.ix_(r_ok, c_ok)] = plane[np.ix_(rows[0][r_ok], cols[0][c_ok])]
        return out

    i_idx, j_idx, k_idx = (window(volume.shape[a], c, h)
                           for a, (c, h) in enumerate(zip((i, j, k), half, strict=True)))  # fmt: skip
    axial = take(volume[:, :, k], i_idx, j_idx).T[::-1, ::-1]  # rows A->P, cols R->L
    coronal = take(volume[:, j_plane, :], i_idx, k_idx).T[::-1, ::-1]  # rows S->I, cols R->L
    return axial, coronal, float(spacing[0])


def select_findings(per_nodule: pd.DataFrame, candidates: pd.DataFrame,
                    per_kind: int = PER_KIND) -> list[tuple[str, pd.Series]]:  # fmt: skip
    """The findings shown: the most confident hits, the misses (largest first) and the
    most confident false positives of the headline set (the test set where there is one)."""
    sets = list(dict.fromkeys(per_nodule["set"]))
    headline = next((s for s in sets if s.startswith("test")), sets[0] if sets else None)
    nodules = per_nodule[per_nodule["set"] == headline]
    cands = candidates[candidates["set"] == headline]
    hits = nodules[nodules["hit"].astype(bool)].sort_values("probability", ascending=False)
    misses = nodules[~nodules["hit"].astype(bool)].sort_values("diameter_mm", ascending=False)
    fps = cands[cands["status"] == "fp"].sort_values("probability", ascending=False)
    chosen = [("hit", r) for _, r in hits.head(per_kind).iterrows()]
    chosen += [("miss", r) for _, r in misses.head(per_kind).iterrows()]
    chosen += [("false positive", r) for _, r in fps.head(per_kind).iterrows()]
    return chosen


def plot_crops(findings: Sequence[tuple[str, pd.Series]], path: str | os.PathLike) -> Figure:
    """Axial and coronal crops around each finding (a pair of panels per finding), the
    nodule's diameter (or the candidate's position) circled."""
    import matplotlib as mpl

    colours = {"hit": OKABE_ITO[2], "miss": OKABE_ITO[5], "false positive": OKABE_ITO[1]}
    with mpl.rc_context(_STYLE):
        n = max(1, len(findings))
        cols = 4
        rows = int(np.ceil(n / 2))
        fig = _new_figure((cols * 2.1, rows * 2.3 + 0.3))
        if not findings:
            _message(fig.add_subplot(), "no finding to show")
            return _save(fig, path)
        axes = fig.subplots(rows, cols, squeeze=False)
        cache: dict[str, tuple] = {}
        for ax in axes.ravel():
            ax.set_axis_off()
        for n_done, (kind, finding) in enumerate(findings):
            image_path = finding.get("image")
            if not isinstance(image_path, str) or not Path(image_path).is_file():
                continue
            if image_path not in cache:
                cache = {image_path: _canonical(image_path)}  # one volume in memory at a time
            volume, affine = cache[image_path]
            world = [finding["coordX"], finding["coordY"], finding["coordZ"]]
            axial, coronal, mm = crop_planes(volume, affine, world)
            diameter = float(finding.get("diameter_mm", np.nan))
            radius_px = (diameter / 2 / mm) if diameter > 0 else 4.0
            label = f"{kind}"
            if pd.notna(finding.get("probability")):
                label += f" p={float(finding['probability']):.2f}"
            if diameter > 0:
                label += f", {diameter:.0f} mm"
            for c, (plane, name) in enumerate(((axial, "axial"), (coronal, "coronal"))):
                ax = axes.ravel()[2 * n_done + c]
                ax.imshow(plane, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1],
                          interpolation="nearest")  # fmt: skip
                centre = ((plane.shape[1] - 1) / 2, (plane.shape[0] - 1) / 2)
                ax.add_patch(Circle(centre, radius_px + 2, fill=False, lw=1.2,
                                    color=colours[kind], linestyle="-" if kind != "miss" else "--"))  # fmt: skip
                ax.set_title(f"{label}\n{name}" if c == 0 else name, fontsize=7)
        fig.suptitle(f"{CROP_MM:.0f} mm crops: hits, misses and top false positives", fontsize=9)
    return _save(fig, path)


def draw_localization_figures(evaluation_dir: Path, out: Mapping[str, Path]) -> None:
    from radflow.tables import read_tsv
    from radflow.tasks.localization.evaluation import (
        EVAL_CANDIDATES,
        EVAL_JSON,
        EVAL_PER_NODULE,
        headline_values,
    )

    plot_froc(headline_values(evaluation_dir / EVAL_JSON), out["froc"])
    findings = select_findings(read_tsv(evaluation_dir / EVAL_PER_NODULE),
                               read_tsv(evaluation_dir / EVAL_CANDIDATES))  # fmt: skip
    plot_crops(findings, out["crops"])
