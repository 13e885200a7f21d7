"""LUNA16 nodule detection scoring: FROC curve, the seven sensitivities and CPM.

    python -m radflow.luna16 annotations.csv annotations_excluded.csv seriesuids.csv \\
        candidates.csv [--out DIR] [--n-boot N] [--seed S]

The semantics are those of LUNA16's evaluation script, ``noduleCADEvaluationLUNA16.py``
(Setio et al., Medical Image Analysis 42, 2017; read as stored in fionaxzhou/cancer at
commit 5634731918f483f07bfdf99697e5708ec8688030). The script's function behind each rule
is in brackets.

1. Scans are the rows of seriesuids.csv; annotations and candidates on other series are
   ignored [``collect``, ``collectNoduleAnnotations``, ``evaluateCAD``: everything is
   gathered per listed scan]. ``score`` keeps such candidates in its table as "unlisted".
2. A scan keeps at most 100 candidates: where it has more, only those with a probability
   strictly above its 101st highest [``evaluateCAD``, ``maxNumberOfCADMarks=100`` as
   ``noduleCADEvaluation`` passes it]; the others are "over_cap".
3. A candidate hits a finding when its squared distance to the finding's centre is
   strictly below (diameter / 2)^2; a finding with a negative diameter (the excluded
   findings of LUNA16 have -1) is given 10 mm [``evaluateCAD``].
4. An included nodule (annotations.csv) is detected when a candidate hits it, with the
   highest probability among the candidates hitting it (the first in file order on a
   tie). A candidate that hits an included nodule is never a false positive: it is "tp"
   where it is the best candidate of a nodule (of two, if it hits two: both count as
   detected, as in the script), "duplicate" otherwise. A candidate that hits no included
   nodule but an excluded finding (annotations_excluded.csv) is "excluded": ignored.
   Every other candidate is "fp".
5. The FROC curve is the ROC curve (as ``sklearn.metrics.roc_curve``) of the detected
   nodules (positives, at their best probability) against the false positives, rescaled:
   false positives per scan = fpr * n_fp / n_scans, sensitivity = tpr * n_detected /
   n_nodules, so a missed nodule lowers the sensitivity at every rate; with no false
   positive at all every point has 0 false positives per scan [``computeFROC``].
6. The sensitivity at a rate is read off that curve, CPM is the mean over ``FP_RATES``.
   The script draws the curve interpolated linearly (``np.interp``) [``evaluateCAD``]
   but prints no CPM; how the seven values are read differs between its users, so
   ``READINGS`` offers three: "grid" (default: the curve interpolated on the script's
   ``np.linspace(0.125, 8, 10001)`` and read at the grid point nearest the rate, at
   most 2.9e-4 FPs/scan away, as the copies of the script that print a CPM do, e.g.
   DeepLung's, and so the published figures computed with them), "interpolate"
   (``np.interp`` at the rate itself, as MONAI's ``compute_froc_score``) and "nearest_point" (the curve point nearest the rate, the first of equals: the
   "LUNA16 CPM calculator" of DIAG, Radboudumc, stated to reproduce the leaderboard).
   They differ where a vertical step of the curve lies within 3e-4 of a rate.
7. Confidence intervals: scans are drawn with replacement (as many as there are), each
   bringing its nodules and false positives, the FROC is recomputed over the same number
   of scans and interpolated; the bounds are the order statistics sorted[floor(Pz * n)]
   and sorted[floor((1 - Pz) * n)] of the n replicates, Pz = (1 - confidence) / 2
   [``computeFROC_bootstrap``, ``generateBootstrapSet``, ``compute_mean_ci``].

Where this differs from the script:

- The script prints no CPM (rule 6 for the readings offered).
- The script's bootstrap is unseeded (``np.random``); here it is seeded (the draws of
  ``radflow.metrics.bootstrap_draws``). The CPM interval (the script has none) is the
  same order statistic of each replicate's CPM. The band of the curve is given on
  ``CURVE_FPS`` (log-spaced) rather than on the script's 10000-point linear grid.
- Where nodules exist but none is detected the sensitivity is 0 (the script gives NaN,
  or fails when there is no candidate at all); with no nodule it is NaN.
- A series listed twice in seriesuids.csv is an error (the script counts it twice).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from radflow import metrics as M
from radflow.evaluate import _jsonable
from radflow.tables import write_bytes_atomic, write_tsv

__all__ = [
    "CURVE_FPS",
    "EXCLUDED_DIAMETER_MM",
    "FP_RATES",
    "MAX_MARKS_PER_SCAN",
    "READINGS",
    "LunaInputError",
    "LunaScore",
    "froc",
    "match_candidates",
    "read_annotations",
    "read_candidates",
    "read_seriesuids",
    "score",
    "sensitivity_at",
]

#: False positives per scan at which sensitivity is read; CPM is their mean.
FP_RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)
#: Diameter given to a finding whose diameter is negative (LUNA16's excluded findings).
EXCLUDED_DIAMETER_MM = 10.0
#: Candidates kept per scan, the most probable (the script's maxNumberOfCADMarks).
MAX_MARKS_PER_SCAN = 100
#: How sensitivities are read off the FROC curve at FP_RATES (module docstring, rule 6).
READINGS = ("grid", "interpolate", "nearest_point")
#: The script's grid for the drawn curve (fps_itp in evaluateCAD), used by "grid".
SCRIPT_GRID_FPS = np.linspace(0.125, 8, 10001)
#: Rates of the stored curve and its band: ten per doubling, the seven rates among them.
CURVE_FPS = 0.125 * 2.0 ** (np.arange(61) / 10)
CONFIDENCE = 0.95
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_XYZ = ["coordX", "coordY", "coordZ"]


class LunaInputError(ValueError):
    """A LUNA16 file that cannot be read as such; the message names file, line, column."""


# ---------------------------------------------------------------------- reading
def _rows(path: str | os.PathLike) -> tuple[Path, csv.reader]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LunaInputError(f"{path}: cannot read: {err}") from None
    return path, csv.reader(io.StringIO(text))


def _read_points(path: str | os.PathLike, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of a headed CSV: `columns[0]` as text, the others as finite floats."""
    path, reader = _rows(path)
    header = [name.strip() for name in next(reader, [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise LunaInputError(
            f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(header)}; "
            f"expected {','.join(columns)})"
        )
    where = [header.index(c) for c in columns]
    values: dict[str, list] = {c: [] for c in columns}
    for row in reader:
        if not any(f.strip() for f in row):
            continue
        line = reader.line_num
        if len(row) <= max(where):
            raise LunaInputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        uid = row[where[0]].strip()
        if not uid:
            raise LunaInputError(f"{path}:{line}: column {columns[0]!r} is empty")
        values[columns[0]].append(uid)
        for name, i in zip(columns[1:], where[1:], strict=True):
            text = row[i].strip()
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise LunaInputError(f"{path}:{line}: column {name!r}: {text!r} is not a number")
            values[name].append(number)
    return pd.DataFrame(
        {c: pd.Series(v, dtype=object if c == columns[0] else float) for c, v in values.items()}
    )


def read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    """annotations.csv or annotations_excluded.csv: seriesuid, coordX, coordY, coordZ (world
    mm) and diameter_mm (negative: unknown, see EXCLUDED_DIAMETER_MM), one row per finding
    in file order; other columns are ignored. Raises LunaInputError naming file and line."""
    return _read_points(path, ANNOTATION_COLUMNS)


def read_candidates(path: str | os.PathLike) -> pd.DataFrame:
    """A detection system's candidates: seriesuid, coordX, coordY, coordZ (world mm) and
    probability (higher: more suspicious), one row per candidate in file order (the index
    is the row's position, which per_candidate tables and candidate_index refer to)."""
    return _read_points(path, CANDIDATE_COLUMNS)


def read_seriesuids(path: str | os.PathLike) -> list[str]:
    """The scans evaluated: the first field of each line (LUNA16's file has no header; a
    first line ``seriesuid`` is taken as one). Empty lines are skipped; a series listed
    twice, or no series, is a LunaInputError."""
    path, reader = _rows(path)
    first_line: dict[str, int] = {}
    for row in reader:
        uid = row[0].strip() if row else ""
        if not uid or (reader.line_num == 1 and uid == "seriesuid"):
            continue
        if uid in first_line:
            raise LunaInputError(
                f"{path}:{reader.line_num}: series {uid} is listed again (first on line "
                f"{first_line[uid]})"
            )
        first_line[uid] = reader.line_num
    if not first_line:
        raise LunaInputError(f"{path}: no series listed")
    return list(first_line)


# --------------------------------------------------------------------- matching
def _positions_by_scan(table: pd.DataFrame) -> dict[str, NDArray[np.intp]]:
    if table.empty:
        return {}
    return {
        uid: np.asarray(pos) for uid, pos in table.groupby("seriesuid", sort=False).indices.items()
    }


def _within_cap(candidates: pd.DataFrame, max_marks: int | None) -> NDArray[np.bool_]:
    """Which candidates a scan keeps: all, or where it has more than `max_marks`, those
    above its (max_marks + 1)-th highest probability (ties at that value all go)."""
    keep = np.ones(len(candidates), dtype=bool)
    if max_marks is None:
        return keep
    prob = candidates["probability"].to_numpy(float)
    for pos in _positions_by_scan(candidates).values():
        if pos.size > max_marks:
            cut = np.sort(prob[pos])[::-1][max_marks]
            keep[pos] = prob[pos] > cut
    return keep


def _hits(points: pd.DataFrame, findings: pd.DataFrame) -> NDArray[np.bool_]:
    """(n_points, n_findings): point strictly inside the finding's sphere."""
    p = points[_XYZ].to_numpy(float)
    f = findings[_XYZ].to_numpy(float)
    diameter_mm = findings["diameter_mm"].to_numpy(float)
    radius_sq = (np.where(diameter_mm < 0.0, EXCLUDED_DIAMETER_MM, diameter_mm) / 2.0) ** 2
    d = p[:, None, :] - f[None, :, :]
    # summed in the script's order, so the boundary case rounds as it does there
    dist_sq = d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2
    return dist_sq < radius_sq[None, :]


def match_candidates(
    annotations: pd.DataFrame,
    excluded: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Assign candidates to nodules as LUNA16 does (rules 2-4 of the module docstring).

    Inputs are tables as ``read_annotations`` / ``read_candidates`` return them (world
    coordinates in mm); every row is used, whatever its series. Returns

    - per_nodule: one row per annotation (same index), its columns plus ``hit`` (bool),
      ``probability`` (the best hitting candidate's, NaN if missed) and
      ``candidate_index`` (that candidate's index label in `candidates`, -1 if missed);
    - per_candidate: one row per candidate (same index), its columns plus ``status``
      ("tp", "duplicate", "excluded", "fp" or "over_cap") and ``nodule_index`` (index
      label in `annotations` of the nodule it detects or duplicates, else -1).
    """
    prob = candidates["probability"].to_numpy(float)
    if not np.isfinite(prob).all():
        raise ValueError("candidate probabilities must be finite")
    keep = _within_cap(candidates, max_marks_per_scan)
    status = np.where(keep, "fp", "over_cap").astype(object)
    cand_nodule = np.full(len(candidates), -1, dtype=np.int64)
    nod_hit = np.zeros(len(annotations), dtype=bool)
    nod_prob = np.full(len(annotations), np.nan)
    nod_cand = np.full(len(annotations), -1, dtype=np.int64)
    nod_labels = annotations.index.to_numpy()
    cand_labels = candidates.index.to_numpy()

    nodules_of = _positions_by_scan(annotations)
    excluded_of = _positions_by_scan(excluded)
    for uid, pos in _positions_by_scan(candidates[keep]).items():
        pos = np.flatnonzero(keep)[pos]
        scan = candidates.iloc[pos]
        is_nodule_hit = np.zeros(pos.size, dtype=bool)
        npos = nodules_of.get(uid, np.empty(0, dtype=np.intp))
        if npos.size:
            hits = _hits(scan, annotations.iloc[npos])
            detected = hits.any(axis=0)
            best = np.argmax(np.where(hits, prob[pos][:, None], -np.inf), axis=0)
            nod_hit[npos] = detected
            nod_prob[npos[detected]] = prob[pos][best[detected]]
            nod_cand[npos[detected]] = cand_labels[pos][best[detected]]
            is_nodule_hit = hits.any(axis=1)
            first_hit = np.argmax(hits, axis=1)
            status[pos[is_nodule_hit]] = "duplicate"
            cand_nodule[pos[is_nodule_hit]] = nod_labels[npos[first_hit[is_nodule_hit]]]
            # reversed, so a candidate best for two nodules names the first of them
            for j in np.flatnonzero(detected)[::-1]:
                status[pos[best[j]]] = "tp"
                cand_nodule[pos[best[j]]] = nod_labels[npos[j]]
        epos = excluded_of.get(uid, np.empty(0, dtype=np.intp))
        if epos.size:
            on_excluded = _hits(scan, excluded.iloc[epos]).any(axis=1) & ~is_nodule_hit
            status[pos[on_excluded]] = "excluded"

    per_nodule = annotations.assign(hit=nod_hit, probability=nod_prob, candidate_index=nod_cand)
    per_candidate = candidates.assign(status=status, nodule_index=cand_nodule)
    return per_nodule, per_candidate


# ------------------------------------------------------------------------- FROC
def _froc_curve(
    detected_prob: NDArray[np.float64], fp_prob: NDArray[np.float64], n_nodules: int, n_scans: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(fps per scan, sensitivity, thresholds) of rule 5."""
    labels = np.r_[np.ones(detected_prob.size, np.int64), np.zeros(fp_prob.size, np.int64)]
    fpr, tpr, thresholds = M.roc_curve(labels, np.r_[detected_prob, fp_prob])
    fps = fpr * fp_prob.size / n_scans if fp_prob.size else np.zeros(fpr.shape)
    if n_nodules == 0:
        sens = np.full(tpr.shape, np.nan)
    else:
        sens = tpr * detected_prob.size / n_nodules if detected_prob.size else np.zeros(tpr.shape)
    return fps, sens, thresholds


def sensitivity_at(
    fps: NDArray[np.float64],
    sensitivity: NDArray[np.float64],
    rates: Sequence[float] = FP_RATES,
    reading: str = "grid",
) -> NDArray[np.float64]:
    """Sensitivity of a FROC curve (points in ``froc``'s order) at each rate, read as
    `reading` says (one of READINGS, module docstring rule 6)."""
    rates = np.asarray(rates, dtype=float)
    if reading == "interpolate":
        return np.interp(rates, fps, sensitivity)
    if reading == "grid":
        nearest = np.abs(SCRIPT_GRID_FPS[None, :] - rates[:, None]).argmin(axis=1)
        return np.interp(SCRIPT_GRID_FPS[nearest], fps, sensitivity)
    if reading == "nearest_point":
        return sensitivity[np.abs(fps[None, :] - rates[:, None]).argmin(axis=1)]
    raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")


def froc(
    per_nodule: pd.DataFrame,
    per_candidate: pd.DataFrame,
    n_scans: int,
    *,
    reading: str = "grid",
) -> dict:
    """FROC of a matching (``match_candidates``' tables) over `n_scans` scans.

    Returns fps (false positives per scan) and sensitivity (fractions of all nodules,
    missed ones included), the curve's points from the highest threshold down, with
    thresholds (the probability each point is taken at, +inf first); sensitivities
    (a tuple, one per FP_RATES, read as `reading` says), cpm, and the counts n_scans, n_nodules, n_detected, n_fp.
    """
    if n_scans < 1:
        raise ValueError(f"n_scans must be >= 1, got {n_scans}")
    hit = per_nodule["hit"].to_numpy(bool)
    detected_prob = per_nodule["probability"].to_numpy(float)[hit]
    fp_prob = per_candidate.loc[per_candidate["status"] == "fp", "probability"].to_numpy(float)
    fps, sens, thresholds = _froc_curve(detected_prob, fp_prob, len(per_nodule), n_scans)
    at_rates = sensitivity_at(fps, sens, FP_RATES, reading)
    return {
        "fps": fps,
        "sensitivity": sens,
        "thresholds": thresholds,
        "sensitivities": tuple(float(s) for s in at_rates),
        "cpm": float(at_rates.mean()),
        "n_scans": n_scans,
        "n_nodules": len(per_nodule),
        "n_detected": int(hit.sum()),
        "n_fp": int(fp_prob.size),
    }


def _order_statistic_ci(
    values: NDArray[np.float64], confidence: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per column: sorted[floor(Pz * n)], sorted[floor((1 - Pz) * n)] (rule 7)."""
    if values.shape[0] == 0:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan.copy()
    ordered = np.sort(values, axis=0)
    pz = (1.0 - confidence) / 2.0
    n = ordered.shape[0]
    return ordered[math.floor(pz * n)], ordered[min(math.floor((1.0 - pz) * n), n - 1)]


def _bootstrap_froc(
    per_nodule: pd.DataFrame,
    per_candidate: pd.DataFrame,
    seriesuids: Sequence[str],
    n_boot: int,
    seed: int,
    reading: str,
) -> NDArray[np.float64]:
    """(n_valid, 7 + len(CURVE_FPS)): sensitivities at FP_RATES then CURVE_FPS, one row
    per replicate that has a nodule (rule 7)."""
    code = {uid: i for i, uid in enumerate(seriesuids)}
    fp = per_candidate[per_candidate["status"] == "fp"]
    scan = np.r_[per_nodule["seriesuid"].map(code), fp["seriesuid"].map(code)].astype(np.intp)
    prob = np.r_[per_nodule["probability"].to_numpy(float), fp["probability"].to_numpy(float)]
    kind = np.r_[np.where(per_nodule["hit"], 1, 2), np.zeros(len(fp), np.int64)]  # 2: missed
    # sorted by probability once: replicates (np.repeat) stay sorted, which roc_curve's
    # stable sort then handles in linear time
    order = np.argsort(np.nan_to_num(prob, nan=-np.inf), kind="stable")
    scan, prob, kind = scan[order], prob[order], kind[order]
    rows = []
    for drawn in M.bootstrap_draws(len(seriesuids), n_boot, seed):
        idx = np.repeat(np.arange(scan.size), np.bincount(drawn, minlength=len(seriesuids))[scan])
        k, p = kind[idx], prob[idx]
        n_nodules = int(np.count_nonzero(k > 0))
        if n_nodules == 0:
            continue
        fps, sens, _ = _froc_curve(p[k == 1], p[k == 0], n_nodules, len(seriesuids))
        rows.append(
            np.r_[sensitivity_at(fps, sens, FP_RATES, reading), np.interp(CURVE_FPS, fps, sens)]
        )
    return np.array(rows).reshape(-1, len(FP_RATES) + CURVE_FPS.size)


@dataclass
class LunaScore:
    """A system's LUNA16 score: sensitivities at FP_RATES and CPM with bootstrap CIs, the
    FROC curve on CURVE_FPS with its pointwise band, and the matching behind them."""

    sensitivities: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    cpm: float
    cpm_ci_low: float
    cpm_ci_high: float
    curve_fps: NDArray[np.float64]
    curve_sensitivity: NDArray[np.float64]
    curve_ci_low: NDArray[np.float64]
    curve_ci_high: NDArray[np.float64]
    per_nodule: pd.DataFrame = field(repr=False)
    per_candidate: pd.DataFrame = field(repr=False)
    n_scans: int
    n_nodules: int
    n_candidates: int
    n_boot: int
    n_boot_valid: int
    seed: int
    confidence: float = CONFIDENCE
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN
    reading: str = "grid"

    def summary(self) -> dict:
        """Plain numbers of the score (NaN as None), as written to froc.json."""
        counts = self.per_candidate["status"].value_counts()
        return _jsonable(
            {
                "fp_rates": FP_RATES,
                "sensitivities": self.sensitivities,
                "ci_low": self.ci_low,
                "ci_high": self.ci_high,
                "cpm": self.cpm,
                "cpm_ci_low": self.cpm_ci_low,
                "cpm_ci_high": self.cpm_ci_high,
                "confidence": self.confidence,
                "n_scans": self.n_scans,
                "n_nodules": self.n_nodules,
                "n_detected": int(self.per_nodule["hit"].sum()),
                "n_candidates": self.n_candidates,
                "candidates": {s: int(counts.get(s, 0)) for s in _STATUSES},
                "max_marks_per_scan": self.max_marks_per_scan,
                "reading": self.reading,
                "bootstrap": {
                    "n_boot": self.n_boot,
                    "n_valid": self.n_boot_valid,
                    "seed": self.seed,
                },
                "curve": {
                    "fps": self.curve_fps,
                    "sensitivity": self.curve_sensitivity,
                    "ci_low": self.curve_ci_low,
                    "ci_high": self.curve_ci_high,
                },
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2, allow_nan=False) + "\n"


_STATUSES = ("tp", "duplicate", "excluded", "fp", "over_cap", "unlisted")


def score(
    annotations: pd.DataFrame,
    excluded: pd.DataFrame,
    seriesuids: Sequence[str],
    candidates: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    confidence: float = CONFIDENCE,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
    reading: str = "grid",
) -> LunaScore:
    """Score `candidates` on the scans `seriesuids` as LUNA16 does (module docstring).

    Annotations on other scans are dropped; candidates on other scans are kept in
    per_candidate with status "unlisted" and count nowhere else. n_candidates counts the
    candidates on listed scans (as the script's "Total number of candidates", which is
    after the 100-per-scan cap; here before it). CIs come from `n_boot` bootstrap
    replicates of the scans, seeded by `seed`.
    """
    if len(set(seriesuids)) != len(seriesuids):
        raise ValueError("seriesuids lists a series twice")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    listed = set(seriesuids)
    on_listed = candidates["seriesuid"].isin(listed).to_numpy()
    per_nodule, matched = match_candidates(
        annotations[annotations["seriesuid"].isin(listed)],
        excluded[excluded["seriesuid"].isin(listed)],
        candidates[on_listed],
        max_marks_per_scan=max_marks_per_scan,
    )
    unlisted = candidates[~on_listed].assign(status="unlisted", nodule_index=-1)
    per_candidate = pd.concat([matched, unlisted]).loc[candidates.index]
    point = froc(per_nodule, matched, len(seriesuids), reading=reading)
    curve = np.interp(CURVE_FPS, point["fps"], point["sensitivity"])
    boot = _bootstrap_froc(per_nodule, matched, list(seriesuids), n_boot, seed, reading)
    n_rates = len(FP_RATES)
    boot_cpm = boot[:, :n_rates].mean(axis=1, keepdims=True)
    low, high = _order_statistic_ci(np.hstack([boot, boot_cpm]), confidence)
    return LunaScore(
        sensitivities=point["sensitivities"],
        ci_low=tuple(float(v) for v in low[:n_rates]),
        ci_high=tuple(float(v) for v in high[:n_rates]),
        cpm=point["cpm"],
        cpm_ci_low=float(low[-1]),
        cpm_ci_high=float(high[-1]),
        curve_fps=CURVE_FPS.copy(),
        curve_sensitivity=curve,
        curve_ci_low=low[n_rates:-1],
        curve_ci_high=high[n_rates:-1],
        per_nodule=per_nodule,
        per_candidate=per_candidate,
        n_scans=len(seriesuids),
        n_nodules=len(per_nodule),
        n_candidates=int(on_listed.sum()),
        n_boot=n_boot,
        n_boot_valid=boot.shape[0],
        seed=seed,
        confidence=confidence,
        max_marks_per_scan=max_marks_per_scan,
        reading=reading,
    )


# ---------------------------------------------------------------------- command
def format_score(result: LunaScore | Mapping) -> str:
    """The seven sensitivities and CPM with their CIs, three decimals, one per line."""
    s = result.summary() if isinstance(result, LunaScore) else result
    pct = f"{100 * s['confidence']:.0f}% CI"

    def fmt(x) -> str:
        return "  nan" if x is None else f"{x:.3f}"

    lines = [
        f"LUNA16 FROC: {s['n_scans']} scans, {s['n_nodules']} nodules "
        f"({s['n_detected']} detected), {s['n_candidates']} candidates "
        + "("
        + ", ".join(f"{n} {k}" for k, n in s["candidates"].items() if n)
        + ")",
        f"{'FPs/scan':>9}  sensitivity  {pct}",
    ]
    for rate, sens, low, high in zip(
        s["fp_rates"], s["sensitivities"], s["ci_low"], s["ci_high"], strict=True
    ):
        lines.append(f"{rate:>9g}  {fmt(sens):>11}  [{fmt(low)}, {fmt(high)}]")
    lines.append(
        f"{'CPM':>9}  {fmt(s['cpm']):>11}  [{fmt(s['cpm_ci_low'])}, {fmt(s['cpm_ci_high'])}]"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radflow.luna16", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("annotations", help="annotations.csv (included nodules)")
    parser.add_argument("excluded", help="annotations_excluded.csv (findings ignored)")
    parser.add_argument("seriesuids", help="seriesuids.csv (the scans, one per line)")
    parser.add_argument(
        "candidates", help="the system's candidates (seriesuid,coordX,coordY,coordZ,probability)"
    )
    parser.add_argument("--out", help="folder for froc.json, per_nodule.tsv and froc.png")
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--reading", choices=READINGS, default="grid",
                        help="how sensitivities are read off the curve (default grid)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        result = score(
            read_annotations(args.annotations),
            read_annotations(args.excluded),
            read_seriesuids(args.seriesuids),
            read_candidates(args.candidates),
            n_boot=args.n_boot,
            seed=args.seed,
            reading=args.reading,
        )
    except ValueError as err:  # LunaInputError among them
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_score(result))
    n_unlisted = int((result.per_candidate["status"] == "unlisted").sum())
    if n_unlisted:
        print(f"note: {n_unlisted} candidates on series not in {args.seriesuids} were ignored")
    if args.out:
        from radflow.figures import plot_froc

        out = Path(args.out)
        summary = result.summary()
        write_bytes_atomic(out / "froc.json", result.to_json().encode())
        write_tsv(result.per_nodule, out / "per_nodule.tsv")
        plot_froc(summary, out / "froc.png")
        print(f"wrote {out / 'froc.json'}, {out / 'per_nodule.tsv'}, {out / 'froc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
