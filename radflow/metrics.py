"""Binary-classification metrics and bootstrap confidence intervals, in plain numpy.

In the style of ``sklearn.metrics``: pure functions of two 1-D arrays, ``y_true`` (labels
in {0, 1}) and ``y_score`` (predicted probability of the positive class, or any score
where higher means "more positive"), returning numbers or arrays. No I/O, no plotting,
no global state. Every function is exact in the presence of tied scores.

Where a metric is undefined for the data (e.g. AUROC when only one class is present,
PPV when nothing is predicted positive) it returns ``nan`` instead of raising, so that a
bootstrap replicate drawing a single class can be skipped and counted rather than abort
the evaluation. Invalid *inputs* (labels other than 0/1, non-finite scores, length
mismatch) do raise ``ValueError``.

Rates (sensitivity, specificity, FPR, TPR, precision, recall, ECE, ...) are fractions in
[0, 1]; Brier score is in squared probability units, also within [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BootstrapResult",
    "average_precision",
    "binary_metrics_at",
    "bootstrap_case_ci",
    "bootstrap_ci",
    "bootstrap_cis",
    "bootstrap_draws",
    "brier_score",
    "confusion_at",
    "expected_calibration_error",
    "precision_recall_curve",
    "reliability_bins",
    "roc_auc",
    "roc_band",
    "roc_curve",
    "youden_threshold",
]

Metric = Callable[[NDArray[np.int64], NDArray[np.float64]], float]


# ------------------------------------------------------------------- validation
def _check(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    y = np.asarray(y_true)
    p = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.shape[0]} values but y_score has {p.shape[0]}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif y.dtype.kind in "iu":
        # min/max instead of np.isin: this runs once per metric per bootstrap replicate.
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"y_true must contain only 0 and 1, found {np.unique(y)[:5].tolist()}")
    else:
        binary = (y == 0) | (y == 1)
        if not np.all(binary):
            bad = list(dict.fromkeys(y[~binary].tolist()))[:5]
            raise ValueError(f"y_true must contain only 0 and 1, found {bad}")
    if not np.isfinite(p).all():
        raise ValueError("y_score contains NaN or infinite values")
    return y.astype(np.int64, copy=False), p


def _clf_curve(
    y: NDArray[np.int64], p: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Cumulative (fps, tps) at each distinct score, thresholds in decreasing order.

    Entry i counts the cases with score >= thresholds[i]; tied scores form one entry,
    which is what makes every curve and AUC below exact under ties.
    """
    # A stable sort is O(n) on already-ascending input, which is how the bootstrap hands
    # replicates over (see _Resampler), so replicates skip the O(n log n) sort.
    order = np.argsort(p, kind="stable")[::-1]
    p_sorted = p[order]
    y_sorted = y[order]
    last_of_tie = np.flatnonzero(np.diff(p_sorted))
    idx = np.append(last_of_tie, p_sorted.size - 1)
    tps = np.cumsum(y_sorted)[idx]
    fps = (idx + 1) - tps
    return fps, tps, p_sorted[idx]


def _two_class_counts(y_true: ArrayLike, y_score: ArrayLike):
    """(fps, tps, thresholds, n_pos, n_neg) of ``_clf_curve``, or None when the data are
    empty or hold a single class (every rank-based metric is undefined then)."""
    y, p = _check(y_true, y_score)
    if y.size == 0:
        return None
    fps, tps, thr = _clf_curve(y, p)
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return None
    return fps, tps, thr, n_pos, n_neg


# ----------------------------------------------------------------- ROC and PR
def roc_curve(
    y_true: ArrayLike, y_score: ArrayLike, *, drop_intermediate: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Receiver operating characteristic, as ``sklearn.metrics.roc_curve``.

    Returns (fpr, tpr, thresholds): point i is the rate of cases with score >=
    thresholds[i]; thresholds decrease, the first is +inf so the curve starts at (0, 0).
    ``drop_intermediate`` removes collinear points (they change neither plot nor AUC).
    With one class present, fpr or tpr is all-NaN (sklearn warns; here it is silent).
    """
    y, p = _check(y_true, y_score)
    if y.size == 0:
        nan = np.array([np.nan])
        return nan, nan.copy(), np.array([np.inf])
    fps, tps, thr = _clf_curve(y, p)
    if drop_intermediate and fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thr = np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thr


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic over (n_pos * n_neg).

    The probability that a random positive scores higher than a random negative, a tie
    counting one half (the midrank tie correction). Equals ``roc_auc_score``. NaN when
    only one class is present.
    """
    counts = _two_class_counts(y_true, y_score)
    if counts is None:
        return float("nan")
    fps, tps, _, n_pos, n_neg = counts
    d_tp = np.diff(tps, prepend=0)
    d_fp = np.diff(fps, prepend=0)
    # Positives in a tie group beat the negatives scored strictly lower (n_neg - fps)
    # and tie with the negatives in their own group (d_fp), counted one half.
    u = np.sum(d_tp * ((n_neg - fps) + 0.5 * d_fp))
    return float(u / (n_pos * n_neg))


def precision_recall_curve(
    y_true: ArrayLike, y_score: ArrayLike, *, drop_intermediate: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Precision-recall pairs, as ``sklearn.metrics.precision_recall_curve``.

    Returns (precision, recall, thresholds) with thresholds *increasing*, recall
    decreasing, and a final point (precision 1, recall 0) without a threshold, so
    ``len(precision) == len(thresholds) + 1``. With no positives, recall is NaN (sklearn
    sets it to 1 and warns).
    """
    y, p = _check(y_true, y_score)
    if y.size == 0:
        return np.array([1.0]), np.array([0.0]), np.zeros(0)
    fps, tps, thr = _clf_curve(y, p)
    if drop_intermediate and fps.size > 2:
        # Points sharing a tps value share a recall; keep the first and last of each run.
        keep = np.r_[True, np.logical_or(np.diff(tps[:-1]), np.diff(tps[1:])), True]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    predicted_pos = tps + fps
    precision = tps / predicted_pos  # every entry predicts >= 1 case positive
    recall = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Average precision (area under the PR curve, step-wise), as ``average_precision_score``.

    AP = sum_n (R_n - R_{n-1}) * P_n over the distinct thresholds: no linear
    interpolation, which would be optimistic. NaN when there are no positives (sklearn
    returns 0 with a warning).
    """
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    if np.isnan(recall).any():
        return float("nan")
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


# ----------------------------------------------------------- operating points
def youden_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Score threshold maximising Youden's J = sensitivity + specificity - 1.

    Applied as "positive if score >= threshold" (as in ``confusion_at``). J only changes at
    observed scores, so it is flat over the gap between the best observed score t* and
    the next lower one; the threshold is placed in the middle of that gap. On the data it
    is chosen from this gives the same calls as t*, but on new data it does not sit right
    at the weakest called positive (on a perfectly separated validation fold, t* is the
    lowest positive score, and every slightly weaker positive would be missed). Among
    equal J, the highest t* wins (fewer cases called positive). J is compared in exact
    integer arithmetic (tp * n_neg - fp * n_pos). NaN when only one class is present.
    """
    counts = _two_class_counts(y_true, y_score)
    if counts is None:
        return float("nan")
    fps, tps, thr, n_pos, n_neg = counts
    j_scaled = tps * n_neg - fps * n_pos
    # argmax returns the first maximum and thresholds decrease: the highest one wins.
    best = int(np.argmax(j_scaled))
    if best + 1 < len(thr):
        return float((thr[best] + thr[best + 1]) / 2)
    return float(thr[best])


def confusion_at(
    y_true: ArrayLike, y_score: ArrayLike, threshold: float
) -> tuple[int, int, int, int]:
    """Counts (tn, fp, fn, tp) when a case is predicted positive iff score >= threshold."""
    y, p = _check(y_true, y_score)
    pred = p >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(y.size - tp - fp - fn)
    return tn, fp, fn, tp


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def binary_metrics_at(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> dict[str, float]:
    """Threshold-dependent metrics at "positive iff score >= threshold".

    Returns a dict with keys accuracy, sensitivity (recall, TPR), specificity (TNR), ppv
    (precision), npv and f1, each a fraction in [0, 1]; a ratio with a zero denominator
    (e.g. sensitivity without positives) is NaN.
    """
    tn, fp, fn, tp = confusion_at(y_true, y_score, threshold)
    return {
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


# ----------------------------------------------------------------- calibration
def brier_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean squared difference between predicted probability and outcome (lower is better)."""
    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    return float(np.mean((p - y) ** 2))


def _bin_index(p: NDArray[np.float64], n_bins: int) -> tuple[NDArray[np.intp], NDArray]:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1] for calibration metrics")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins ((m-1)/M, m/M] as in Guo et al. (2017) and sklearn's
    # calibration_curve; the first bin also holds 0.
    return np.searchsorted(edges[1:-1], p, side="left"), edges


def reliability_bins(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10
) -> dict[str, NDArray[np.float64]]:
    """Per-bin calibration on ``n_bins`` equal-width probability bins.

    Bins are right-closed, ``(bin_lower, bin_upper]``, the first one ``[0, upper]``.
    Returns arrays of length n_bins: bin_lower, bin_upper, mean_predicted (mean
    probability in the bin), observed_rate (fraction of positives in the bin), count
    (cases in the bin, float). Empty bins have count 0 and NaN means.
    """
    y, p = _check(y_true, y_prob)
    idx, edges = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(count > 0, sum_p / count, np.nan)
        observed_rate = np.where(count > 0, sum_y / count, np.nan)
    return {
        "bin_lower": edges[:-1].copy(),
        "bin_upper": edges[1:].copy(),
        "mean_predicted": mean_predicted,
        "observed_rate": observed_rate,
        "count": count,
    }


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> float:
    """ECE: sum over bins of (bin count / N) * |observed rate - mean predicted|.

    Equal-width, right-closed bins as in ``reliability_bins``. A fraction in [0, 1]. NaN
    for no cases. Note ECE depends on n_bins and is biased upwards for small N.
    """
    y, p = _check(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    idx, _ = _bin_index(p, n_bins)
    # |sum_y - sum_p| / N per bin equals count/N * |rate - mean|, without empty-bin NaNs.
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    return float(np.sum(np.abs(sum_y - sum_p)) / y.size)


# ------------------------------------------------------------------- bootstrap
class BootstrapResult(NamedTuple):
    """Point estimate on the full data, percentile CI, and the replicates it rests on."""

    point: float
    low: float
    high: float
    n_valid: int  # replicates where the metric was defined (finite)


def bootstrap_draws(n_groups: int, n_boot: int, seed: int) -> Iterator[NDArray[np.int64]]:
    """The bootstrap replicates every CI here rests on, as drawn group positions.

    Each of the ``n_boot`` replicates is ``n_groups`` positions in 0 .. n_groups - 1 drawn
    uniformly with replacement (a group drawn twice counts twice). Deterministic for a
    given seed: ``bootstrap_cis`` with the same seed draws the same replicates.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n_groups, size=n_groups)


class _Resampler:
    """Draws bootstrap replicates, resampling groups (patients) with replacement.

    Cases are stored sorted by score once, and a replicate is built from per-case
    multiplicities (np.repeat), so it comes out already sorted: O(n) per replicate,
    and curve metrics only pay a linear-time stable sort on it.
    """

    def __init__(
        self, y: NDArray[np.int64], p: NDArray[np.float64], groups: ArrayLike | None
    ) -> None:
        order = np.argsort(p, kind="stable")
        self.y = y[order]
        self.p = p[order]
        if groups is None:
            self.codes = np.arange(y.size)
            self.n_groups = y.size
        else:
            g = np.asarray(groups)
            if g.shape != y.shape:
                raise ValueError(f"groups has shape {g.shape}, expected {y.shape}")
            _, codes = np.unique(g, return_inverse=True)
            codes = codes.reshape(-1)
            self.codes = codes[order]
            self.n_groups = int(codes.max()) + 1 if codes.size else 0
        self.case_index = np.arange(y.size)

    def replicates(
        self, n_boot: int, seed: int
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float64]]]:
        for drawn in bootstrap_draws(self.n_groups, n_boot, seed):
            group_mult = np.bincount(drawn, minlength=self.n_groups)
            idx = np.repeat(self.case_index, group_mult[self.codes])
            yield self.y[idx], self.p[idx]


def _check_boot(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def bootstrap_cis(
    metrics: Mapping[str, Metric],
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, BootstrapResult]:
    """Percentile bootstrap CIs for several metrics computed on the *same* replicates.

    ``metrics`` maps a name to ``f(y_true, y_score) -> float`` that returns NaN where it
    is undefined; such replicates are skipped for that metric only and reflected in its
    ``n_valid``. With ``groups`` (e.g. patient pseudonyms, one per case) whole groups are
    resampled with replacement and bring all their cases (cluster bootstrap: studies of
    one patient are not independent); otherwise cases are resampled. The interval is the
    (alpha/2, 1 - alpha/2) quantile pair of the valid replicates (NaN if none). The
    point estimate is the metric on the full data; if it is NaN no replicates are drawn.
    Deterministic for a given seed.
    """
    _check_boot(n_boot, alpha)
    y, p = _check(y_true, y_score)
    points = {name: float(f(y, p)) for name, f in metrics.items()}
    live = [name for name, v in points.items() if np.isfinite(v)]
    values = {name: np.empty(n_boot) for name in live}
    if live:
        sampler = _Resampler(y, p, groups)
        for b, (yb, pb) in enumerate(sampler.replicates(n_boot, seed)):
            for name in live:
                values[name][b] = metrics[name](yb, pb)
    out: dict[str, BootstrapResult] = {}
    for name, point in points.items():
        if name not in values:
            out[name] = BootstrapResult(point, float("nan"), float("nan"), 0)
            continue
        valid = values[name][np.isfinite(values[name])]
        if valid.size == 0:
            out[name] = BootstrapResult(point, float("nan"), float("nan"), 0)
            continue
        low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
        out[name] = BootstrapResult(point, float(low), float(high), int(valid.size))
    return out


def bootstrap_ci(
    metric: Metric,
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Percentile bootstrap CI of one metric: (point, low, high, n_valid).

    See ``bootstrap_cis`` for the resampling scheme; ``metric(y_true, y_score)`` must
    return NaN where undefined (e.g. one class only), and such replicates are skipped
    and not counted in n_valid.
    """
    return bootstrap_cis(
        {"metric": metric}, y_true, y_score, groups=groups, n_boot=n_boot, seed=seed, alpha=alpha
    )["metric"]


def bootstrap_case_ci(
    statistic: Callable[[NDArray[np.intp]], float],
    n_cases: int,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Percentile bootstrap CI of a statistic of per-case data of any kind.

    ``statistic(case_index)`` gets the positions (0 .. n_cases - 1, with repeats) of the
    cases drawn in a replicate, ``np.arange(n_cases)`` for the point estimate, and returns
    a float, NaN where undefined (such replicates are skipped, as in ``bootstrap_cis``).
    Resampling (of cases, or of whole ``groups``), the interval and the seed's replicates
    are those of ``bootstrap_cis``: this only hands it case positions as the scores.
    """
    positions = np.arange(n_cases, dtype=np.float64)  # ascending: the resampler keeps the order

    def metric(_labels: NDArray[np.int64], drawn: NDArray[np.float64]) -> float:
        return statistic(drawn.astype(np.intp))

    return bootstrap_ci(
        metric,
        np.zeros(n_cases, dtype=np.int64),
        positions,
        groups=groups,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )


def _interp_roc(
    fpr: NDArray[np.float64], tpr: NDArray[np.float64], grid: NDArray[np.float64]
) -> NDArray[np.float64]:
    """TPR of a ROC polyline at each grid FPR; at a vertical segment, the upper end.

    np.interp is undefined for repeated x values, which ROC curves always have.
    """
    i = np.searchsorted(fpr, grid, side="right") - 1  # last point with fpr <= x
    i = np.clip(i, 0, fpr.size - 1)
    j = np.minimum(i + 1, fpr.size - 1)
    x0, x1 = fpr[i], fpr[j]
    dx = x1 - x0
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(dx > 0, (grid - x0) / np.where(dx > 0, dx, 1.0), 0.0)
    return tpr[i] + np.clip(w, 0.0, 1.0) * (tpr[j] - tpr[i])


def roc_band(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    fpr_grid: ArrayLike | None = None,
) -> dict[str, NDArray[np.float64] | int]:
    """ROC curve on a fixed FPR grid with a pointwise percentile bootstrap band.

    ``fpr_grid`` defaults to ``np.linspace(0, 1, 101)``. Returns fpr (the grid), tpr
    (the full-data ROC interpolated on it; at a vertical step, the upper value),
    tpr_low and tpr_high (pointwise alpha/2 and 1 - alpha/2 quantiles over replicates),
    and n_valid (replicates with both classes, the rest are skipped). Resampling as in
    ``bootstrap_cis`` (same seed, same replicates). The band is pointwise, not a
    simultaneous confidence band for the whole curve.
    """
    _check_boot(n_boot, alpha)
    y, p = _check(y_true, y_score)
    grid = np.linspace(0.0, 1.0, 101) if fpr_grid is None else np.asarray(fpr_grid, float)
    fpr, tpr, _ = roc_curve(y, p)
    nan_curve = np.full(grid.shape, np.nan)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return {
            "fpr": grid,
            "tpr": nan_curve,
            "tpr_low": nan_curve.copy(),
            "tpr_high": nan_curve.copy(),
            "n_valid": 0,
        }
    point = _interp_roc(fpr, tpr, grid)
    curves = np.empty((n_boot, grid.size))
    n_valid = 0
    for yb, pb in _Resampler(y, p, groups).replicates(n_boot, seed):
        fb, tb, _ = roc_curve(yb, pb)
        if np.isnan(fb[-1]) or np.isnan(tb[-1]):
            continue
        curves[n_valid] = _interp_roc(fb, tb, grid)
        n_valid += 1
    if n_valid == 0:
        low, high = nan_curve, nan_curve.copy()
    else:
        low, high = np.quantile(curves[:n_valid], [alpha / 2, 1 - alpha / 2], axis=0)
    return {"fpr": grid, "tpr": point, "tpr_low": low, "tpr_high": high, "n_valid": n_valid}
