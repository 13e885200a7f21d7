"""Binary image classification: the first task on radflow's stages.

A residual network with two logits and cross-entropy; a case's output is the
probability of the positive class; the checkpoint is chosen by validation AUROC. Its
predictions are a table with the probability (`prob`, Platt-scaled on the fold's own
validation cases where config `evaluate.calibration` is "platt") and the model's raw
probability (`prob_uncalibrated`); the evaluation is `radflow.evaluate`'s (metrics with
patient-level bootstrap CIs, a threshold chosen on validation data); its figures are
ROC, precision-recall, calibration and confusion matrix, and Grad-CAM maps of the test
set's most confident true and false positives. See radflow.tasks.base for the interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflow import conventions as C
from radflow.metrics import roc_auc
from radflow.tasks.base import StageFile, Task

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from radflow.models import ModelSettings

#: The workflow's report captions (report/ beside the package).
REPORT_DIR = Path(__file__).resolve().parents[2] / "report"
#: Prediction column: the fold model's probability before calibration.
UNCALIBRATED = f"{C.PROB}_uncalibrated"


def _performance(file: str, caption: str, label: str) -> StageFile:
    return StageFile(file, "Performance", REPORT_DIR / caption, {"figure": label})


def _explanation(file: str, label: str) -> StageFile:
    return StageFile(file, "Explanations", REPORT_DIR / "gradcam.rst", {"figure": label})


class BinaryClassification(Task):
    name = "classification"
    monitor = "val_auroc"  # higher is better; selects the checkpoint kept per fold
    monitor_label = "AUROC"
    monitor_axis = "AUROC (fraction)"
    calibration_methods = ("platt", "none")

    def __init__(self, train=None, options=None):
        super().__init__(train, options)
        self.label_smoothing = train.label_smoothing if train is not None else 0.0

    # ------------------------------------------------------------------ training
    def build_model(
        self, model: ModelSettings, *, in_channels: int, spatial_dims: int
    ) -> nn.Module:
        from radflow.models.resnet import build_resnet

        return build_resnet(
            model.depth,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=2,
            base_width=model.base_width,
            dropout=model.dropout,
            pooling=model.pooling,
            residual=model.residual,
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), targets.long(), label_smoothing=self.label_smoothing)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-case output: probability of the positive class, (N,)."""
        import torch

        return torch.softmax(logits.float(), dim=1)[:, 1]

    def monitor_value(self, targets: np.ndarray, outputs: np.ndarray) -> float:
        if len(np.unique(targets)) < 2:
            return float("nan")
        return roc_auc(targets, outputs)

    # ------------------------------------------------------------------- predict
    def prediction_table(self, cases: pd.DataFrame, outputs: np.ndarray) -> pd.DataFrame:
        """`cases` with `prob` and `prob_uncalibrated`, both the model's probability
        until `calibrate` rescales `prob`."""
        table = cases.copy()
        table[C.PROB] = outputs
        table[UNCALIBRATED] = table[C.PROB]
        return table

    def calibrate(self, predictions: pd.DataFrame, method: str) -> pd.DataFrame:
        """With "platt", `prob` becomes the Platt scaling of `prob_uncalibrated`
        fitted on the validation rows (radflow.calibration); "none" leaves it."""
        if method == "none":
            return predictions
        if method != "platt":
            return super().calibrate(predictions, method)  # the error naming the choices
        from radflow.calibration import apply_platt, fit_platt

        out = predictions.copy()
        val = out[C.SPLIT] == C.SPLIT_VAL
        a, b = fit_platt(out.loc[val, C.LABEL].to_numpy(), out.loc[val, C.PROB])
        out[C.PROB] = apply_platt(out[UNCALIBRATED].to_numpy(), a, b)
        folds = ", ".join(str(k) for k in sorted(set(out[C.FOLD])))
        print(f"fold {folds}: Platt scaling on validation predictions: a={a:.3f}, b={b:.3f}")
        return out

    # ------------------------------------------------------------------ evaluate
    def evaluation_files(self) -> dict[str, StageFile]:
        return {
            "metrics": StageFile(C.EVAL_METRICS_JSON),
            "table": StageFile(
                C.EVAL_METRICS_TSV,
                "Metrics",
                REPORT_DIR / "metrics.rst",
                {"table": "ensemble on the test set"},
            ),
            "per_case": StageFile(C.EVAL_PER_CASE),
            "curves": StageFile(C.EVAL_CURVES),
        }

    def evaluate(
        self, predictions: pd.DataFrame, settings: Mapping[str, Any], out_dir: Path
    ) -> str:
        """`radflow.evaluate.evaluate_classification` with config `evaluate:` (n_boot,
        alpha, calibration_bins), written by `write_evaluation`."""
        from radflow.evaluate import evaluate_classification, write_evaluation

        result = evaluate_classification(
            predictions,
            n_boot=settings["n_boot"],
            alpha=settings["alpha"],
            n_calibration_bins=settings["calibration_bins"],
        )
        write_evaluation(result, out_dir)
        auroc = result.metrics["ensemble_test"]["auroc"]
        return (
            f"ensemble test AUROC {auroc['value']:.3f} "
            f"(95% CI {auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})"
        )

    # ------------------------------------------------------------------- figures
    def figure_files(self) -> dict[str, StageFile]:
        return {
            "roc": _performance("roc.png", "roc.rst", "ROC"),
            "precision_recall": _performance(
                "precision_recall.png", "precision_recall.rst", "precision-recall"
            ),
            "calibration": _performance("calibration.png", "calibration.rst", "calibration"),
            "confusion": _performance("confusion.png", "confusion.rst", "confusion matrix"),
        }

    def draw_figures(self, evaluation_dir: Path, out: Mapping[str, Path]) -> None:
        """From the evaluation's curves.json (radflow.figures)."""
        import json

        from radflow import figures

        curves = json.loads((Path(evaluation_dir) / C.EVAL_CURVES).read_text())
        figures.plot_roc(curves, out["roc"])
        figures.plot_precision_recall(curves, out["precision_recall"])
        figures.plot_calibration(curves, out["calibration"])
        figures.plot_confusion(curves, out["confusion"])

    def case_figure_files(self) -> dict[str, StageFile]:
        return {
            "gradcam_true_positives": _explanation(
                "gradcam_true_positives.png", "Grad-CAM, true positives"
            ),
            "gradcam_false_positives": _explanation(
                "gradcam_false_positives.png", "Grad-CAM, false positives"
            ),
        }

    def draw_case_figures(
        self,
        *,
        models: Sequence[Path],
        preprocessed: Sequence[Path],
        evaluation_dir: Path,
        annotations: Path,
        settings: Mapping[str, Any],
        out: Mapping[str, Path],
        threads: int,
    ) -> str:
        """Grad-CAM of the test set's `figures.cam_cases` most confident true and false
        positives at `figures.cam_layer` (radflow.gradcam)."""
        from radflow.gradcam import run_cam_figures

        counts = run_cam_figures(
            models,
            preprocessed,
            Path(evaluation_dir) / C.EVAL_PER_CASE,
            annotations,
            task=self,
            layer=settings["cam_layer"],
            n_cases=settings["cam_cases"],
            out_true_positive=out["gradcam_true_positives"],
            out_false_positive=out["gradcam_false_positives"],
            threads=threads,
        )
        return f"Grad-CAM cases: {counts}"
