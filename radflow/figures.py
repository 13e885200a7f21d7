"""Figures of an evaluation, drawn from numbers already computed (never recomputed here).

Every function takes parts of the ``curves`` dict written by ``radflow.evaluate`` (or
DataFrames / arrays), saves one PNG at ``DPI`` dots per inch to ``path`` (atomically:
temporary file + os.replace), and returns the ``matplotlib.figure.Figure`` so tests can
inspect what was drawn. Figures are built with the object API on an Agg canvas, never
through pyplot, so no figure is registered globally, nothing needs closing, and the
caller's backend and rcParams are left alone (styling is scoped with rc_context).

Colours: the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies); heat maps use the perceptually uniform "inferno".
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from radflow.tables import atomic_path

__all__ = [
    "DPI",
    "OKABE_ITO",
    "plot_calibration",
    "plot_cam_grid",
    "plot_confusion",
    "plot_froc",
    "plot_precision_recall",
    "plot_roc",
    "plot_ablation_gradients",
    "plot_ablation_test_metric",
    "plot_ablation_training",
    "plot_training_curves",
]

DPI = 150
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
)
_MAIN = OKABE_ITO[0]
_ACCENT = OKABE_ITO[5]
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
#: Columns of every training history; the task's monitor column comes with them.
TRAINING_COLUMNS = ("epoch", "train_loss", "val_loss", "lr")


# --------------------------------------------------------------------- helpers
def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot registry involved
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Figure:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return fig


def _arr(values: Any) -> np.ndarray:
    """Float array from JSON lists, where None (an undefined value) becomes NaN."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _with_ci(block: Mapping[str, Any] | None, level: str = "95%", digits: int = 3) -> str:
    """'0.912 (95% CI 0.871\u20130.948)' from a {value, ci_low, ci_high} block."""
    if not block:
        return "n/a"
    text = _fmt(block.get("value"), digits)
    low, high = block.get("ci_low"), block.get("ci_high")
    if low is not None and high is not None:
        text += f" ({level} CI {_fmt(low, digits)}\u2013{_fmt(high, digits)})"
    return text


def _ci_pct(curves: Mapping[str, Any]) -> str:
    level = curves.get("ci_level")
    return f"{100 * level:.0f}%" if level is not None else "95%"


def _cohort(curves: Mapping[str, Any]) -> str:
    n, pos = curves.get("n_cases"), curves.get("n_positive")
    return "" if n is None else f" (n = {n}, {pos} positive)"


def _unit_square(ax: Axes) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")


def _message(ax: Axes, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)


# ------------------------------------------------------------ evaluation plots
def plot_roc(curves: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """ROC of the fold ensemble on the test set, with its bootstrap band and each fold.

    Uses curves["roc"] (fpr, tpr, auroc block, band {fpr, tpr_low, tpr_high}),
    curves["roc_folds"] (optional) and curves["operating_point"] (optional). Axes:
    false positive rate and true positive rate as fractions. The ensemble line is
    ``fig.axes[0].lines[0]``.
    """
    roc = curves["roc"]
    pct = _ci_pct(curves)
    with mpl.rc_context(_STYLE):
        fig = _new_figure((5.2, 5.0))
        ax = fig.add_subplot()
        ax.plot(
            _arr(roc["fpr"]),
            _arr(roc["tpr"]),
            color=_MAIN,
            lw=2,
            zorder=4,
            label=f"ensemble, AUC {_with_ci(roc.get('auroc'), pct)}",
        )
        band = roc.get("band")
        if band:
            ax.fill_between(
                _arr(band["fpr"]),
                _arr(band["tpr_low"]),
                _arr(band["tpr_high"]),
                color=_MAIN,
                alpha=0.2,
                lw=0,
                step=None,
                label=f"{pct} bootstrap band (pointwise)",
            )
        for i, fold in enumerate(curves.get("roc_folds", [])):
            ax.plot(
                _arr(fold["fpr"]),
                _arr(fold["tpr"]),
                color=OKABE_ITO[1 + i % (len(OKABE_ITO) - 2)],
                lw=0.8,
                alpha=0.8,
                label=f"fold {fold['fold']}, AUC {_fmt(fold.get('auroc'))}",
            )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="chance")
        op = curves.get("operating_point")
        if op and op.get("fpr") is not None:
            ax.plot(
                [op["fpr"]],
                [op["tpr"]],
                ls="none",
                marker="o",
                ms=8,
                mfc="white",
                mec=_ACCENT,
                mew=2,
                zorder=5,
                label=f"threshold {_fmt(op.get('threshold'))} (from validation)",
            )
        _unit_square(ax)
        ax.set_xlabel("False positive rate (1 \u2212 specificity, fraction)")
        ax.set_ylabel("True positive rate (sensitivity, fraction)")
        ax.set_title(f"ROC \u2013 fold ensemble on held-out test set{_cohort(curves)}")
        ax.legend(loc="lower right")
    return _save(fig, path)


def plot_precision_recall(curves: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Precision-recall curve (step-wise, as average precision integrates it) of the
    ensemble on the test set, with the prevalence baseline. Uses curves["pr"]
    (recall, precision, auprc block, prevalence). The curve is fig.axes[0].lines[0]."""
    pr = curves["pr"]
    with mpl.rc_context(_STYLE):
        fig = _new_figure((5.2, 5.0))
        ax = fig.add_subplot()
        ax.step(
            _arr(pr["recall"]),
            _arr(pr["precision"]),
            where="post",
            color=_MAIN,
            lw=2,
            label=f"ensemble, AP {_with_ci(pr.get('auprc'), _ci_pct(curves))}",
        )
        prevalence = pr.get("prevalence")
        if prevalence is not None:
            ax.axhline(
                prevalence,
                ls="--",
                color="grey",
                lw=0.8,
                label=f"prevalence baseline {prevalence:.3f}",
            )
        _unit_square(ax)
        ax.set_xlabel("Recall (sensitivity, fraction)")
        ax.set_ylabel("Precision (positive predictive value, fraction)")
        ax.set_title(f"Precision\u2013recall \u2013 test set{_cohort(curves)}")
        ax.legend(loc="lower left")
    return _save(fig, path)


def plot_calibration(curves: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Reliability diagram with the per-bin case counts in a panel below.

    Uses curves["calibration"] (bin_lower, bin_upper, mean_predicted, observed_rate,
    count, ece and brier blocks). Empty bins are not drawn. The reliability line is
    fig.axes[0].lines[1] (lines[0] is the diagonal); the count bars are
    fig.axes[1].patches.
    """
    cal = curves["calibration"]
    lower, upper = _arr(cal["bin_lower"]), _arr(cal["bin_upper"])
    mean_pred, observed = _arr(cal["mean_predicted"]), _arr(cal["observed_rate"])
    count = _arr(cal["count"])
    filled = count > 0
    pct = _ci_pct(curves)
    with mpl.rc_context(_STYLE):
        fig = _new_figure((5.2, 6.0))
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        top.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
        top.plot(
            mean_pred[filled],
            observed[filled],
            marker="o",
            color=_MAIN,
            lw=1.5,
            label="ensemble (per bin)",
        )
        top.set_xlim(0, 1)
        top.set_ylim(-0.01, 1.01)
        top.set_ylabel("Observed fraction positive")
        top.legend(loc="upper left")
        top.set_title(
            f"Calibration \u2013 test set{_cohort(curves)}\n"
            f"ECE {_with_ci(cal.get('ece'), pct)}, Brier {_with_ci(cal.get('brier'), pct)}"
        )
        bottom.bar(
            lower,
            count,
            width=upper - lower,
            align="edge",
            color=OKABE_ITO[4],
            edgecolor="white",
        )
        bottom.set_xlabel("Mean predicted probability (fraction)")
        bottom.set_ylabel("Cases per bin")
    return _save(fig, path)


def plot_confusion(curves: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """2x2 confusion matrix: counts with row-normalised percentages (of each true class).

    Uses curves["confusion"] (matrix [[tn, fp], [fn, tp]], row_labels, col_labels,
    threshold). Cell texts are fig.axes[0].texts in row-major order.
    """
    conf = curves["confusion"]
    matrix = np.asarray(conf["matrix"], dtype=float)
    if matrix.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2, got shape {matrix.shape}")
    row_sums = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(row_sums > 0, matrix / row_sums, np.nan)
    with mpl.rc_context({**_STYLE, "axes.grid": False}):
        fig = _new_figure((4.8, 4.4))
        ax = fig.add_subplot()
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for r in range(2):
            for c in range(2):
                pct = "n/a" if np.isnan(share[r, c]) else f"{100 * share[r, c]:.1f}%"
                ax.text(
                    c,
                    r,
                    f"{int(matrix[r, c])}\n({pct})",
                    ha="center",
                    va="center",
                    fontsize=12,
                    color="white" if share[r, c] > 0.6 else "black",
                )
        # Two-line tick labels keep the 2x2 square readable at this size.
        cols = conf.get("col_labels", ["predicted 0", "predicted 1"])
        rows = conf.get("row_labels", ["label 0", "label 1"])
        ax.set_xticks([0, 1], [str(t).replace(" ", "\n", 1) for t in cols])
        ax.set_yticks([0, 1], [str(t).replace(" ", "\n", 1) for t in rows])
        ax.set_xlabel("Prediction")
        ax.set_ylabel("Truth")
        ax.set_title(
            f"Confusion matrix \u2013 test set{_cohort(curves)}\n"
            f"threshold {_fmt(conf.get('threshold'))}; counts (% of true class)"
        )
    return _save(fig, path)


def plot_froc(froc: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """LUNA16 FROC curves with their pointwise bootstrap bands, on a log2 axis of false
    positives per scan, the seven sensitivities marked.

    `froc`: the summary ``radflow.luna16.LunaScore.summary()`` returns (froc.json):
    curve {fps, sensitivity, ci_low, ci_high}, fp_rates, sensitivities, cpm and its
    CI, confidence, n_scans, n_nodules; or several by name ({"out-of-fold": summary,
    ...}), one curve each. The first curve is ``fig.axes[0].lines[0]``, its marks
    ``lines[1]``.
    """
    sets = {"": froc} if "curve" in froc else dict(froc)
    with mpl.rc_context(_STYLE):
        fig = _new_figure((5.6, 4.6))
        ax = fig.add_subplot()
        if not sets:
            _message(ax, "no evaluation set")
            return _save(fig, path)
        colours = [_MAIN, *[c for c in OKABE_ITO if c != _MAIN]]
        for colour, (name, one) in zip(colours, sets.items(), strict=False):
            curve = one["curve"]
            fps = _arr(curve["fps"])
            pct = _ci_pct({"ci_level": one.get("confidence")})
            cpm = {"value": one.get("cpm"), "ci_low": one.get("cpm_ci_low"),
                   "ci_high": one.get("cpm_ci_high")}  # fmt: skip
            prefix = f"{name}: " if name else ""
            ax.plot(fps, _arr(curve["sensitivity"]), color=colour, lw=2, zorder=4,
                    label=f"{prefix}CPM {_with_ci(cpm, pct)}, {one.get('n_nodules')} nodules "
                    f"in {one.get('n_scans')} scans")  # fmt: skip
            rates = _arr(one["fp_rates"])
            ax.plot(rates, _arr(one["sensitivities"]), ls="none", marker="o", ms=5, mfc="white",
                    mec=colour, mew=1.5, zorder=5)  # fmt: skip
            ax.fill_between(fps, _arr(curve["ci_low"]), _arr(curve["ci_high"]), color=colour,
                            alpha=0.2, lw=0)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_xlim(fps.min(), fps.max())
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("Average number of false positives per scan (log scale)")
        ax.set_ylabel("Sensitivity (fraction of nodules)")
        ax.set_title(f"FROC (LUNA16), {pct} pointwise bootstrap band over scans; "
                     "marks: 1/8 \u2013 8 FPs/scan", fontsize=9)  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# -------------------------------------------------------------------- training
def plot_training_curves(
    histories: Mapping[int, pd.DataFrame],
    path: str | os.PathLike,
    *,
    monitor: str,
    monitor_label: str,
    monitor_axis: str,
) -> Figure:
    """Training histories, one line per fold: loss, the validation score, learning rate.

    ``histories``: {fold: DataFrame with columns epoch, train_loss, val_loss, lr and
    ``monitor``}. The validation score is the task's (radflow.tasks.base.Task):
    ``monitor`` its history column (higher is better), ``monitor_label`` its name in
    the panel title (e.g. "AUROC"), ``monitor_axis`` its axis label (e.g. "AUROC
    (fraction)"). Panels (fig.axes[0..2]): loss (train dashed, val solid, same colour
    per fold), validation score, learning rate (log scale when all positive). Each
    fold's best epoch (max score) is marked with a star on the score panel and a
    dotted vertical line on the others.
    """
    columns = (*TRAINING_COLUMNS, monitor)
    for fold, frame in histories.items():
        lacking = [c for c in columns if c not in frame.columns]
        if lacking:
            raise ValueError(f"training history of fold {fold} lacks column(s) {lacking}")
    with mpl.rc_context(_STYLE):
        fig = _new_figure((12.0, 3.8))
        ax_loss, ax_score, ax_lr = fig.subplots(1, 3)
        if not histories:
            for ax in (ax_loss, ax_score, ax_lr):
                _message(ax, "no training history")
            return _save(fig, path)
        all_lr = []
        for i, fold in enumerate(sorted(histories)):
            h = histories[fold].sort_values("epoch")
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            epoch = h["epoch"].to_numpy(dtype=float)
            ax_loss.plot(
                epoch, h["train_loss"], ls="--", color=colour, lw=1, label=f"fold {fold} train"
            )
            ax_loss.plot(epoch, h["val_loss"], color=colour, lw=1.5, label=f"fold {fold} val")
            ax_score.plot(epoch, h[monitor], color=colour, lw=1.5, label=f"fold {fold}")
            lr = h["lr"].to_numpy(dtype=float)
            all_lr.append(lr)
            ax_lr.plot(epoch, lr, color=colour, lw=1.5, label=f"fold {fold}")
            score = h[monitor].to_numpy(dtype=float)
            if np.isfinite(score).any():
                best = int(np.nanargmax(score))
                ax_score.plot(
                    [epoch[best]],
                    [score[best]],
                    ls="none",
                    marker="*",
                    ms=11,
                    color=colour,
                    mec="black",
                    mew=0.5,
                    zorder=5,
                )
                for ax in (ax_loss, ax_lr):
                    ax.axvline(epoch[best], color=colour, ls=":", lw=0.8)
        lr_values = np.concatenate(all_lr)
        if lr_values.size and np.all(lr_values[np.isfinite(lr_values)] > 0):
            ax_lr.set_yscale("log")
        ax_loss.set_title("Loss (dashed: training, solid: validation)")
        ax_loss.set_ylabel("Loss (training objective)")
        ax_score.set_title(f"Validation {monitor_label} (\u2605 best epoch)")
        ax_score.set_ylabel(monitor_axis)
        ax_lr.set_title("Learning rate")
        ax_lr.set_ylabel("Learning rate (per step)")
        for ax in (ax_loss, ax_score, ax_lr):
            ax.set_xlabel("Epoch")
        ax_loss.legend(ncols=2, fontsize=7)
        ax_score.legend(fontsize=7)
        fig.suptitle("Training curves per fold")
    return _save(fig, path)


# --------------------------------------------------------------------- ablation
#: The ablation's two variants, in panel order, and their colours where they share axes.
ABLATION_VARIANTS = {"plain": _ACCENT, "residual": _MAIN}


def _depth_colours(depths) -> dict[int, str]:
    return {d: OKABE_ITO[i % len(OKABE_ITO)] for i, d in enumerate(sorted(set(depths)))}


def _fold_mean_curve(frames: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple:
    """Mean over folds of curves (x, y) sampled at different x: each is interpolated
    onto the x of the longest one, within its own range."""
    grid = max((x for x, _ in frames), key=len)
    stack = np.vstack(
        [
            np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan)
            for x, y in frames
        ]
    )
    return grid, np.nanmean(stack, axis=0)


def plot_ablation_training(
    steps: pd.DataFrame, histories: pd.DataFrame, path: str | os.PathLike
) -> Figure:
    """Training loss against training time, plain networks (left) and residual networks
    (right) side by side, one colour per depth, in the layout of He et al. (2016), Fig. 4.

    ``steps``: variant, depth, fold, step (0-based over the run), epoch, train_loss (one
    row per step); ``histories``: variant, depth, fold, epoch, val_loss. Thin lines:
    training loss of every step; bold lines: validation loss at the end of each epoch;
    both averaged over the folds. The x axis is in epochs (step / steps per epoch), so
    that folds of slightly different sizes line up.
    """
    colours = _depth_colours(steps["depth"]) if len(steps) else {}
    with mpl.rc_context(_STYLE):
        fig = _new_figure((11.0, 4.0))
        axes = fig.subplots(1, len(ABLATION_VARIANTS), sharey=True)
        for ax, variant in zip(axes, ABLATION_VARIANTS, strict=True):
            mine = steps[steps["variant"] == variant]
            if mine.empty:
                _message(ax, f"no {variant} networks in this ablation")
                continue
            for depth in sorted(mine["depth"].unique()):
                curves, val = [], []
                for fold, run in mine[mine["depth"] == depth].groupby("fold"):
                    per_epoch = (run["epoch"] == run["epoch"].min()).sum()
                    x = (run["step"].to_numpy(dtype=float) + 1) / per_epoch
                    curves.append((x, run["train_loss"].to_numpy(dtype=float)))
                    h = histories[
                        (histories["variant"] == variant)
                        & (histories["depth"] == depth)
                        & (histories["fold"] == fold)
                    ].sort_values("epoch")
                    val.append((h["epoch"].to_numpy(dtype=float), h["val_loss"].to_numpy(float)))
                x, y = _fold_mean_curve(curves)
                ax.plot(x, y, color=colours[depth], lw=0.6, alpha=0.55)
                if all(len(v[0]) for v in val):
                    ve, vl = _fold_mean_curve(val)
                    ax.plot(ve, vl, color=colours[depth], lw=2.0, label=f"{variant}-{depth}")
            ax.set_title(f"{variant.capitalize()} networks")
            ax.set_xlabel("Epoch (training steps / steps per epoch)")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("Loss (training objective)")
        fig.suptitle(
            "Training loss (thin: every step) and validation loss (bold: every epoch), "
            "mean over folds"
        )
    return _save(fig, path)


def plot_ablation_gradients(gradients: pd.DataFrame, path: str | os.PathLike) -> Figure:
    """Gradient norm of each weighted layer against its position from input to output,
    one panel per snapshot (initialisation, after the first steps, end of training).

    ``gradients``: variant, depth, fold, snapshot, step, index, path, grad_norm
    (radflow.gradients.GRADIENT_COLUMNS plus the job's keys). Main-path layers only
    (projection shortcuts are in the table, not drawn); the median over folds; log
    scale, so a gradient of exactly zero (a zero-init residual branch at
    initialisation) leaves a gap. Colour: depth; dashed: plain, solid: residual.
    """
    snapshots = {"init": "at initialisation", "early": "after the first steps", "end": "at the end"}
    main = gradients[gradients["path"] == "main"]
    colours = _depth_colours(main["depth"]) if len(main) else {}
    with mpl.rc_context(_STYLE):
        fig = _new_figure((13.0, 4.0))
        axes = fig.subplots(1, len(snapshots), sharey=True)
        for ax, (snapshot, title) in zip(axes, snapshots.items(), strict=True):
            rows = main[main["snapshot"] == snapshot]
            if rows.empty:
                _message(ax, f"no gradients {title}")
                continue
            for (variant, depth), run in rows.groupby(["variant", "depth"]):
                median = run.groupby("index")["grad_norm"].median()
                step = int(run["step"].iloc[0])
                ax.plot(
                    median.index,
                    median.where(median > 0),
                    color=colours[depth],
                    ls="--" if variant == "plain" else "-",
                    marker=".",
                    ms=3,
                    lw=1.2,
                    label=f"{variant}-{depth}",
                )
            ax.set_yscale("log")
            ax.set_title(f"Gradient norms {title} (step {step})")
            ax.set_xlabel("Layer (1 = first after the input)")
        axes[0].set_ylabel("L2 norm of the weight gradient")
        axes[-1].legend(fontsize=7, ncols=2)
        fig.suptitle("Gradient norm by layer, input to output (median over folds)")
    return _save(fig, path)


def plot_ablation_test_metric(
    summary: pd.DataFrame,
    path: str | os.PathLike,
    *,
    monitor: str,
    monitor_label: str,
    monitor_axis: str,
) -> Figure:
    """The task's monitor on the test set against depth, per variant.

    ``summary``: radflow.ablation.summarise's table. Large markers with error bars: the
    ensemble of the fold models with its patient-level bootstrap CI; small hollow
    markers: the single fold models.
    """
    name = f"test_{monitor.removeprefix('val_')}"
    depths = sorted(summary["depth"].unique())
    position = {d: i for i, d in enumerate(depths)}
    with mpl.rc_context(_STYLE):
        fig = _new_figure((6.5, 4.2))
        ax = fig.subplots()
        if summary.empty:
            _message(ax, "no ablation jobs")
            return _save(fig, path)
        for k, (variant, colour) in enumerate(ABLATION_VARIANTS.items()):
            mine = summary[summary["variant"] == variant]
            if mine.empty:
                continue
            shift = -0.12 if k == 0 else 0.12
            ens = mine[mine["fold"] == "ensemble"].sort_values("depth")
            x = np.array([position[d] for d in ens["depth"]]) + shift
            value = ens[name].to_numpy(dtype=float)
            err = np.vstack(
                [value - ens[f"{name}_ci_low"].to_numpy(float),
                 ens[f"{name}_ci_high"].to_numpy(float) - value]
            )  # fmt: skip
            ax.errorbar(x, value, yerr=np.abs(err), color=colour, marker="o", ms=7, capsize=3,
                        lw=1.5, label=f"{variant}, ensemble (95% CI)")  # fmt: skip
            folds = mine[mine["fold"] != "ensemble"]
            ax.plot(
                np.array([position[d] for d in folds["depth"]]) + 2 * shift,
                folds[name].to_numpy(dtype=float),
                ls="none",
                marker="o",
                ms=4,
                mfc="none",
                color=colour,
                label=f"{variant}, single fold models",
            )
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("Depth (weighted layers)")
        ax.set_ylabel(f"Test {monitor_axis}")
        ax.set_title(f"Test {monitor_label} by depth, plain and residual")
        ax.legend(fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------- CAMs
def _robust_limits(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    # Percentiles, not min/max: one hot pixel would otherwise wash the image out.
    low, high = np.percentile(finite, [1, 99])
    return (float(low), float(high)) if high > low else (float(low), float(low) + 1.0)


def plot_cam_grid(
    items: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str
) -> Figure:
    """Grid of images with class-activation-map overlays and ground-truth rings.

    Each item: image (2-D float array, H x W, any intensity unit; shown in grey between
    its 1st and 99th percentile), cam (H x W array in [0, 1]; drawn with "inferno",
    opacity rising with activation so unactivated tissue stays visible), caption (text
    under the panel), circles (list of (row, col, radius) in pixels, drawn as unfilled
    rings; may be empty). At most 4 panels per row. An empty list gives a figure saying
    "no cases in this category". Panels are fig.axes in item order.
    """
    n = len(items)
    n_cols = max(1, min(4, n))
    n_rows = max(1, math.ceil(n / n_cols))
    with mpl.rc_context({**_STYLE, "axes.grid": False}):
        fig = _new_figure((3.0 * n_cols, 3.3 * n_rows + 0.5))
        # wrap long titles to the grid's width so narrow grids do not clip them
        fig.suptitle(textwrap.fill(title, width=max(40, 34 * n_cols)))
        if n == 0:
            _message(fig.add_subplot(), "no cases in this category")
            return _save(fig, path)
        axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
        for i, (ax, item) in enumerate(zip(axes, items, strict=False)):
            image = np.asarray(item["image"], dtype=float)
            cam = np.asarray(item["cam"], dtype=float)
            if image.ndim != 2:
                raise ValueError(f"item {i}: image must be 2-D, got shape {image.shape}")
            if cam.shape != image.shape:
                raise ValueError(
                    f"item {i}: cam shape {cam.shape} differs from image shape {image.shape}"
                )
            vmin, vmax = _robust_limits(image)
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            cam = np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)
            ax.imshow(
                cam, cmap="inferno", vmin=0, vmax=1, alpha=0.6 * cam, interpolation="bilinear"
            )
            for row, col, radius in item.get("circles", ()) or ():
                ax.add_patch(Circle((col, row), radius, fill=False, edgecolor=OKABE_ITO[4], lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_xlabel(str(item.get("caption", "")), fontsize=8, wrap=True)
        for ax in axes[n:]:
            ax.set_axis_off()
    return _save(fig, path)
