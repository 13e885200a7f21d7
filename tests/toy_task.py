"""A toy second task, registered from outside radflow: regression of the label as a number.

It is everything classification is not: one output per case (a score, not a class
probability), mean squared error as the loss, R² as the validation score, a prediction
table with a `score` column, mean absolute error as the evaluation (regression.json,
errors.tsv) and one scatter figure, no calibration and no figures of single cases. The
workflow tests run the tiny study through it (config `task: toy_regression`,
`task_modules: [<this file>]`): the stages must hold no classification code for that
to work. Heavy imports sit inside the methods, as radflow.tasks.base asks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from radflow import conventions as C
from radflow.tasks import StageFile, Task, register

SCORE = "score"
ABS_ERROR = "abs_error"
METRICS = "regression.json"
ERRORS = "errors.tsv"


def r_squared(targets: np.ndarray, outputs: np.ndarray) -> float:
    """1 - SSE/SST; NaN when the targets do not vary."""
    y, p = np.asarray(targets, float), np.asarray(outputs, float)
    sst = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if sst == 0 else 1.0 - float(np.sum((y - p) ** 2)) / sst


@register
class ToyRegression(Task):
    name = "toy_regression"
    monitor = "val_r2"
    monitor_label = "R\u00b2"
    monitor_axis = "R\u00b2 (1 \u2212 SSE/SST)"

    def build_model(self, model, *, in_channels, spatial_dims):
        from radflow.models.resnet import build_resnet

        return build_resnet(
            model.depth,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=1,
            base_width=model.base_width,
            dropout=model.dropout,
            pooling=model.pooling,
            residual=model.residual,
        )

    def loss(self, logits, targets):
        import torch.nn.functional as F

        return F.mse_loss(logits[:, 0].float(), targets.float())

    def outputs(self, logits):
        return logits[:, 0].float()

    def monitor_value(self, targets, outputs):
        return r_squared(targets, outputs)

    def prediction_table(self, cases, outputs):
        table = cases.copy()
        table[SCORE] = outputs
        return table

    def evaluation_files(self) -> dict[str, StageFile]:
        return {
            "metrics": StageFile(METRICS),
            "errors": StageFile(ERRORS, "Metrics", None, {"table": "absolute errors"}),
        }

    def evaluate(self, predictions, settings: Mapping[str, Any], out_dir: Path) -> str:
        """Validation rows as they are (out of fold); test rows as the mean of the folds."""
        import pandas as pd

        from radflow.tables import atomic_path

        val = predictions[predictions[C.SPLIT] == C.SPLIT_VAL]
        test = (
            predictions[predictions[C.SPLIT] == C.SPLIT_TEST]
            .groupby([C.SERIES_PID, C.PATIENT_PID, C.LABEL, C.SPLIT], as_index=False)[SCORE]
            .mean()
        )
        errors = pd.concat([val[test.columns], test], ignore_index=True)
        errors[ABS_ERROR] = (errors[SCORE] - errors[C.LABEL]).abs()
        metrics = {
            split: {
                "mae": float(part[ABS_ERROR].mean()),
                "r2": r_squared(part[C.LABEL], part[SCORE]),
                "n_cases": len(part),
            }
            for split, part in errors.groupby(C.SPLIT)
        }
        out_dir = Path(out_dir)
        with atomic_path(out_dir / METRICS) as tmp:
            Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n")
        with atomic_path(out_dir / ERRORS) as tmp:
            errors.to_csv(tmp, sep="\t", index=False, float_format="%.6f")
        return f"test MAE {metrics[C.SPLIT_TEST]['mae']:.3f}"

    def figure_files(self) -> dict[str, StageFile]:
        return {"scatter": StageFile("toy_scatter.png", "Performance", None, {"figure": "scatter"})}

    def draw_figures(self, evaluation_dir: Path, out: Mapping[str, Path]) -> None:
        import pandas as pd
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from radflow.tables import atomic_path

        errors = pd.read_csv(Path(evaluation_dir) / ERRORS, sep="\t")
        fig = Figure(figsize=(4, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for split, part in errors.groupby(C.SPLIT):
            ax.scatter(part[C.LABEL], part[SCORE], s=12, label=split)
        ax.set_xlabel("label")
        ax.set_ylabel("predicted score")
        ax.legend()
        with atomic_path(out["scatter"]) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
