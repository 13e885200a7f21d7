"""radflow.figures: valid PNGs, the given numbers are what is drawn, no figures left open."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: the tests only use pyplot to count open figures

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from radflow import figures as F  # noqa: E402
from radflow.conventions import (  # noqa: E402
    FOLD,
    LABEL,
    PATIENT_PID,
    PROB,
    SERIES_PID,
    SPLIT,
    SPLIT_TEST,
    SPLIT_VAL,
)
from radflow.evaluate import evaluate_classification  # noqa: E402
from radflow.tasks import get_task  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CLASSIFICATION = get_task("classification")
CLASSIFICATION_MONITOR = {
    "monitor": _CLASSIFICATION.monitor,
    "monitor_label": _CLASSIFICATION.monitor_label,
    "monitor_axis": _CLASSIFICATION.monitor_axis,
}


def _ci(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high, "n_boot_valid": 100}


@pytest.fixture
def curves() -> dict:
    """Hand-made curves dict with known numbers, including JSON nulls (empty bins)."""
    grid = np.linspace(0, 1, 11).tolist()
    return {
        "threshold": 0.42,
        "threshold_source": "youden_out_of_fold_val",
        "ci_level": 0.95,
        "n_cases": 50,
        "n_patients": 40,
        "n_positive": 20,
        "operating_point": {"fpr": 0.2, "tpr": 0.75, "threshold": 0.42},
        "roc": {
            "fpr": [0.0, 0.0, 0.2, 0.5, 1.0],
            "tpr": [0.0, 0.4, 0.75, 0.9, 1.0],
            "auroc": _ci(0.83, 0.71, 0.92),
            "band": {
                "fpr": grid,
                "tpr": grid,
                "tpr_low": [max(0.0, g - 0.1) for g in grid],
                "tpr_high": [min(1.0, g + 0.1) for g in grid],
                "n_boot_valid": 100,
            },
        },
        "roc_folds": [
            {"fold": 0, "fpr": [0, 0.3, 1], "tpr": [0, 0.7, 1], "auroc": 0.7},
            {"fold": 1, "fpr": [0, 0.1, 1], "tpr": [0, 0.5, 1], "auroc": 0.7},
        ],
        "pr": {
            "recall": [1.0, 0.75, 0.5, 0.0],
            "precision": [0.4, 0.6, 0.8, 1.0],
            "auprc": _ci(0.71, 0.6, 0.8),
            "prevalence": 0.4,
        },
        "calibration": {
            "bin_lower": [0.0, 0.25, 0.5, 0.75],
            "bin_upper": [0.25, 0.5, 0.75, 1.0],
            "mean_predicted": [0.1, None, 0.6, 0.9],
            "observed_rate": [0.05, None, 0.5, 0.95],
            "count": [20, 0, 18, 12],
            "ece": _ci(0.056, 0.03, 0.09),
            "brier": _ci(0.12, 0.1, 0.15),
        },
        "confusion": {
            "matrix": [[24, 6], [5, 15]],
            "row_labels": ["negative (label 0)", "positive (label 1)"],
            "col_labels": ["predicted negative", "predicted positive"],
            "threshold": 0.42,
        },
    }


def _assert_png(path, min_bytes: int = 5_000) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= 300  # ~150 dpi, a few inches
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    assert plt.get_fignums() == [], "a figure was left open in pyplot"


# ------------------------------------------------------------------- drawn data
def test_roc_draws_the_given_curve(curves, tmp_path):
    fig = F.plot_roc(curves, tmp_path / "roc.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), curves["roc"]["fpr"])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curves["roc"]["tpr"])
    np.testing.assert_allclose(ax.lines[1].get_xydata(), [[0, 0], [0.3, 0.7], [1, 1]])
    labels = [line.get_label() for line in ax.lines]
    assert labels[0] == "ensemble, AUC 0.830 (95% CI 0.710\u20130.920)"
    assert "fold 1, AUC 0.700" in labels and "chance" in labels
    op = next(line for line in ax.lines if line.get_label().startswith("threshold 0.420"))
    np.testing.assert_allclose(op.get_xydata(), [[0.2, 0.75]])
    band = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(band) == 1
    assert "ROC" in ax.get_title() and "n = 50" in ax.get_title()
    assert "False positive rate" in ax.get_xlabel()
    _assert_png(tmp_path / "roc.png")


def test_precision_recall_draws_curve_and_baseline(curves, tmp_path):
    fig = F.plot_precision_recall(curves, tmp_path / "pr.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), curves["pr"]["recall"])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curves["pr"]["precision"])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.4, 0.4])
    assert "AP 0.710 (95% CI 0.600\u20130.800)" in ax.lines[0].get_label()
    _assert_png(tmp_path / "pr.png")


def test_calibration_draws_filled_bins_and_counts(curves, tmp_path):
    fig = F.plot_calibration(curves, tmp_path / "cal.png")
    top, bottom = fig.axes[:2]
    np.testing.assert_allclose(top.lines[1].get_xydata(), [[0.1, 0.05], [0.6, 0.5], [0.9, 0.95]])
    heights = [bar.get_height() for bar in bottom.patches]
    np.testing.assert_allclose(heights, [20, 0, 18, 12])
    assert "ECE 0.056 (95% CI 0.030\u20130.090)" in top.get_title()
    _assert_png(tmp_path / "cal.png")


def test_confusion_shows_counts_and_row_percentages(curves, tmp_path):
    fig = F.plot_confusion(curves, tmp_path / "conf.png")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["24\n(80.0%)", "6\n(20.0%)", "5\n(25.0%)", "15\n(75.0%)"]
    assert "threshold 0.420" in ax.get_title()
    _assert_png(tmp_path / "conf.png")


def test_training_curves(tmp_path):
    epochs = np.arange(12)
    histories = {
        fold: pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": np.exp(-epochs / 4) + 0.1 * fold,
                "val_loss": np.exp(-epochs / 5) + 0.2,
                "val_auroc": 0.9 - 0.002 * (epochs - (4 + fold)) ** 2,
                "lr": 1e-3 * 0.5 ** (epochs // 4),
            }
        )
        for fold in range(3)
    }
    fig = F.plot_training_curves(histories, tmp_path / "train.png", **CLASSIFICATION_MONITOR)
    ax_loss, ax_auc, ax_lr = fig.axes[:3]
    assert len(ax_loss.lines) == 3 * 2 + 3 and ax_lr.get_yscale() == "log"
    stars = [line for line in ax_auc.lines if line.get_marker() == "*"]
    np.testing.assert_allclose([s.get_xdata()[0] for s in stars], [4, 5, 6])
    np.testing.assert_allclose([s.get_ydata()[0] for s in stars], [0.9, 0.9, 0.9])
    assert ax_auc.get_xlabel() == "Epoch"
    assert ax_auc.get_title() == "Validation AUROC (\u2605 best epoch)"
    assert ax_auc.get_ylabel() == "AUROC (fraction)"
    _assert_png(tmp_path / "train.png")

    with pytest.raises(ValueError, match="fold 0 lacks column"):
        F.plot_training_curves(
            {0: histories[0].drop(columns="lr")}, tmp_path / "x.png", **CLASSIFICATION_MONITOR
        )


def test_training_curves_draw_the_tasks_monitor(tmp_path):
    """The score panel shows whatever column the task monitors, under the task's names;
    a history without that column is refused by name."""
    epochs = np.arange(6)
    history = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": np.exp(-epochs / 4),
            "val_loss": np.exp(-epochs / 5),
            "val_r2": [0.1, 0.3, 0.5, 0.45, 0.4, 0.2],
            "lr": np.full(6, 1e-3),
        }
    )
    monitor = {
        "monitor": "val_r2",
        "monitor_label": "R\u00b2",
        "monitor_axis": "R\u00b2 (fraction)",
    }
    fig = F.plot_training_curves({0: history}, tmp_path / "r2.png", **monitor)
    ax_score = fig.axes[1]
    np.testing.assert_allclose(ax_score.lines[0].get_ydata(), history["val_r2"])
    (star,) = [line for line in ax_score.lines if line.get_marker() == "*"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (2, 0.5)
    assert ax_score.get_title() == "Validation R\u00b2 (\u2605 best epoch)"
    assert ax_score.get_ylabel() == "R\u00b2 (fraction)"
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['val_auroc'\]"):
        F.plot_training_curves({0: history}, tmp_path / "x.png", **CLASSIFICATION_MONITOR)


def test_cam_grid(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:48, :48]
    items = [
        {
            "image": rng.normal(size=(48, 48)),
            "cam": np.exp(-((rows - 20) ** 2 + (cols - 24) ** 2) / 60),
            "caption": f"case {i}: p = 0.9",
            "circles": [(20, 24, 6)] if i % 2 == 0 else [],
        }
        for i in range(5)
    ]
    fig = F.plot_cam_grid(items, tmp_path / "cam.png", "True positives")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 5
    assert [ax.get_xlabel() for ax in panels] == [f"case {i}: p = 0.9" for i in range(5)]
    rings = [p for ax in panels for p in ax.patches if isinstance(p, Circle)]
    assert len(rings) == 3 and rings[0].center == (24, 20) and not rings[0].get_fill()
    assert all(len(ax.images) == 2 for ax in panels)  # grey image + CAM overlay
    assert fig.get_suptitle() == "True positives"
    _assert_png(tmp_path / "cam.png")

    bad = dict(items[0], cam=np.zeros((10, 10)))
    with pytest.raises(ValueError, match="cam shape"):
        F.plot_cam_grid([bad], tmp_path / "bad.png", "x")


def test_empty_inputs_give_a_message(tmp_path):
    fig = F.plot_cam_grid([], tmp_path / "empty.png", "False negatives")
    assert any("no cases in this category" in t.get_text() for ax in fig.axes for t in ax.texts)
    _assert_png(tmp_path / "empty.png", min_bytes=2_000)
    fig = F.plot_training_curves({}, tmp_path / "none.png", **CLASSIFICATION_MONITOR)
    assert any("no training history" in t.get_text() for ax in fig.axes for t in ax.texts)


# ------------------------------------------------------------------ integration
def _predictions(seed: int = 3, n_folds: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        label = int(rng.random() < 0.4)
        rows.append((f"d{i}", f"dp{i}", label, i % n_folds, SPLIT_VAL, rng.beta(2 + 3 * label, 4)))
    for i in range(30):
        label = int(rng.random() < 0.4)
        for fold in range(n_folds):
            rows.append((f"t{i}", f"tp{i}", label, fold, SPLIT_TEST, rng.beta(2 + 3 * label, 4)))
    columns = [SERIES_PID, PATIENT_PID, LABEL, FOLD, SPLIT, PROB]
    return pd.DataFrame(rows, columns=columns)


def test_all_plots_from_a_real_evaluation(tmp_path):
    curves = evaluate_classification(_predictions(), n_boot=50).curves
    for name, plot in [
        ("roc", F.plot_roc),
        ("pr", F.plot_precision_recall),
        ("cal", F.plot_calibration),
        ("conf", F.plot_confusion),
    ]:
        path = tmp_path / "figs" / f"{name}.png"
        plot(curves, path)
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "cal.png",
        "conf.png",
        "pr.png",
        "roc.png",
    ]
