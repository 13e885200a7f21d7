"""Evaluate a k-fold study's predictions: ensemble test metrics with patient-level CIs.

Input is the predictions table concatenated over folds (columns series_pid, patient_pid,
label, fold, split, prob): each fold model k predicts its own validation cases
(split "val", out-of-fold) and every held-out test case (split "test"). Output is an
``EvaluationResult`` with

* ``metrics``  - nested, JSON-serialisable dict (see ``evaluate_classification``);
* ``per_case`` - one row per case and split kind, with the call and its outcome;
* ``curves``   - JSON-serialisable dict of every number the figures draw, so plotting
  never recomputes a metric.

The operating threshold is chosen on the pooled out-of-fold validation predictions and
only then applied to the test set: choosing it on test would make every
threshold-dependent test metric optimistic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from radflow import metrics as M
from radflow.conventions import (
    EVAL_CURVES,
    EVAL_METRICS_JSON,
    EVAL_METRICS_TSV,
    EVAL_PER_CASE,
    FOLD,
    LABEL,
    OUTCOME,
    PATIENT_PID,
    PREDICTED,
    PROB,
    SERIES_PID,
    SPLIT,
    SPLIT_TEST,
    SPLIT_VAL,
    TEST_FOLD,
)
from radflow.tables import atomic_path

__all__ = [
    "REQUIRED_COLUMNS",
    "EvaluationResult",
    "evaluate_classification",
    "prob_fold_column",
    "summary_table",
    "validate_predictions",
    "write_evaluation",
]

REQUIRED_COLUMNS = (SERIES_PID, PATIENT_PID, LABEL, FOLD, SPLIT, PROB)

# Metrics reported with a CI, in report order; threshold-dependent ones use the fixed
# operating threshold in every replicate (the CI excludes threshold-selection noise).
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
METRIC_ORDER = ("auroc", "auprc", *THRESHOLD_METRICS, "brier", "ece")

THRESHOLD_FROM_VAL = "youden_out_of_fold_val"
THRESHOLD_OWN = "youden_on_this_set"


def prob_fold_column(fold: int) -> str:
    """Name of the per_case column holding fold model ``fold``'s test probability."""
    return f"{PROB}_fold{fold}"


@dataclass(frozen=True)
class EvaluationResult:
    """What ``evaluate_classification`` returns; ``write_evaluation`` writes it out."""

    metrics: dict[str, Any]
    per_case: pd.DataFrame
    curves: dict[str, Any]


# ------------------------------------------------------------------- validation
def _first(values: Any) -> Any:
    return sorted(values)[0]


def validate_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Check the predictions table and return a clean copy of the required columns.

    Raises ValueError naming the offending column, fold, case or patient: missing
    columns or values, split not "val"/"test", labels not 0/1, folds not non-negative
    integers, probabilities outside [0, 1], duplicated rows, a case that is both val and
    test or validated by two folds, a label or patient that changes between rows of a
    case, a fold without val rows or lacking some test case, a patient in both the
    validation folds and the test set or in two validation folds (splits must be
    patient-level), or a pooled val or test set with one class only.
    """
    if not isinstance(predictions, pd.DataFrame):
        raise TypeError(f"predictions must be a pandas DataFrame, got {type(predictions)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions lack column(s) {missing}; required: {list(REQUIRED_COLUMNS)}"
        )
    df = predictions.loc[:, list(REQUIRED_COLUMNS)].copy().reset_index(drop=True)
    if df.empty:
        raise ValueError("predictions table has no rows")
    for col in REQUIRED_COLUMNS:
        n_null = int(df[col].isna().sum())
        if n_null:
            raise ValueError(f"column {col!r} has {n_null} missing value(s)")
    for col in (SERIES_PID, PATIENT_PID, SPLIT):
        df[col] = df[col].astype(str)

    bad_split = sorted(set(df[SPLIT]) - {SPLIT_VAL, SPLIT_TEST})
    if bad_split:
        raise ValueError(
            f"column {SPLIT!r} has value(s) {bad_split}; expected {SPLIT_VAL!r} or {SPLIT_TEST!r}"
        )
    label = pd.to_numeric(df[LABEL], errors="coerce")
    bad = label.isna() | ~label.isin([0, 1])
    if bad.any():
        raise ValueError(
            f"column {LABEL!r} must be 0 or 1; found {df.loc[bad, LABEL].iloc[0]!r} "
            f"(series {df.loc[bad, SERIES_PID].iloc[0]!r})"
        )
    df[LABEL] = label.astype(np.int64)
    fold = pd.to_numeric(df[FOLD], errors="coerce")
    bad = fold.isna() | (fold < 0) | (fold != np.floor(fold))
    if bad.any():
        raise ValueError(
            f"column {FOLD!r} must hold integers >= 0; found {df.loc[bad, FOLD].iloc[0]!r} "
            f"(series {df.loc[bad, SERIES_PID].iloc[0]!r})"
        )
    df[FOLD] = fold.astype(np.int64)
    prob = pd.to_numeric(df[PROB], errors="coerce").astype(float)
    bad = ~(np.isfinite(prob) & (prob >= 0) & (prob <= 1))
    if bad.any():
        raise ValueError(
            f"column {PROB!r} has {int(bad.sum())} value(s) that are not probabilities in "
            f"[0, 1], e.g. {df.loc[bad, PROB].iloc[0]!r} (series "
            f"{df.loc[bad, SERIES_PID].iloc[0]!r}, fold {df.loc[bad, FOLD].iloc[0]})"
        )
    df[PROB] = prob

    dup = df.duplicated([SERIES_PID, SPLIT, FOLD], keep=False)
    if dup.any():
        row = df[dup].iloc[0]
        raise ValueError(
            f"series {row[SERIES_PID]!r} appears more than once as {row[SPLIT]!r} "
            f"in fold {row[FOLD]}"
        )
    by_case = df.groupby(SERIES_PID)
    for col in (LABEL, PATIENT_PID):
        n_distinct = by_case[col].nunique()
        if (n_distinct > 1).any():
            raise ValueError(
                f"column {col!r} differs between the rows of series "
                f"{_first(n_distinct.index[n_distinct > 1])!r}"
            )
    n_splits = by_case[SPLIT].nunique()
    if (n_splits > 1).any():
        raise ValueError(
            f"series {_first(n_splits.index[n_splits > 1])!r} is both a {SPLIT_VAL!r} "
            f"and a {SPLIT_TEST!r} case"
        )

    val = df[df[SPLIT] == SPLIT_VAL]
    test = df[df[SPLIT] == SPLIT_TEST]
    val_folds = val.groupby(SERIES_PID)[FOLD].unique()
    multi = val_folds[val_folds.map(len) > 1]
    if len(multi):
        pid = _first(multi.index)
        raise ValueError(
            f"dev case {pid!r} is a {SPLIT_VAL!r} case in folds {sorted(multi[pid].tolist())}; "
            "each dev case must be validated by exactly one fold (column 'fold')"
        )
    folds = sorted(set(df[FOLD]))
    if val.empty:
        raise ValueError(f"no {SPLIT_VAL!r} rows: out-of-fold validation predictions are needed")
    if test.empty:
        raise ValueError(f"no {SPLIT_TEST!r} rows: the held-out test set is needed")
    test_ids = set(test[SERIES_PID])
    for k in folds:
        if not (val[FOLD] == k).any():
            raise ValueError(f"fold {k} has no {SPLIT_VAL!r} rows (column {FOLD!r})")
        lacking = test_ids - set(test.loc[test[FOLD] == k, SERIES_PID])
        if lacking:
            raise ValueError(
                f"fold {k} lacks predictions for {len(lacking)} of {len(test_ids)} test "
                f"case(s), e.g. series {_first(lacking)!r}"
            )

    leak = set(val[PATIENT_PID]) & set(test[PATIENT_PID])
    if leak:
        raise ValueError(
            f"patient {_first(leak)!r} (and {len(leak) - 1} more) has cases in both the "
            "validation folds and the test set; the split must be patient-level"
        )
    pat_folds = val.groupby(PATIENT_PID)[FOLD].nunique()
    if (pat_folds > 1).any():
        pid = _first(pat_folds.index[pat_folds > 1])
        raise ValueError(
            f"patient {pid!r} has validation cases in folds "
            f"{sorted(set(val.loc[val[PATIENT_PID] == pid, FOLD]))}; folds must be patient-level"
        )
    for name, part in ((SPLIT_VAL, val), (SPLIT_TEST, test.drop_duplicates(SERIES_PID))):
        classes = set(part[LABEL])
        if classes != {0, 1}:
            raise ValueError(
                f"the pooled {name!r} cases all have {LABEL!r} {classes.pop()}; "
                "AUROC and a threshold need both classes"
            )
    return df


# ------------------------------------------------------------------ computation
def _threshold_metric(name: str, threshold: float, y: np.ndarray, p: np.ndarray) -> float:
    return M.binary_metrics_at(y, p, threshold)[name]


def _metric_functions(threshold: float, n_bins: int) -> dict[str, M.Metric]:
    fns: dict[str, M.Metric] = {"auroc": M.roc_auc, "auprc": M.average_precision}
    for name in THRESHOLD_METRICS:
        fns[name] = partial(_threshold_metric, name, threshold)
    fns["brier"] = M.brier_score
    fns["ece"] = partial(M.expected_calibration_error, n_bins=n_bins)
    return fns


def _ci_block(r: M.BootstrapResult) -> dict[str, Any]:
    return {"value": r.point, "ci_low": r.low, "ci_high": r.high, "n_boot_valid": r.n_valid}


def _metric_set(
    y: np.ndarray,
    p: np.ndarray,
    patients: np.ndarray,
    threshold: float,
    *,
    n_boot: int,
    seed: int,
    alpha: float,
    n_bins: int,
) -> dict[str, Any]:
    cis = M.bootstrap_cis(
        _metric_functions(threshold, n_bins),
        y,
        p,
        groups=patients,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )
    out: dict[str, Any] = {name: _ci_block(cis[name]) for name in METRIC_ORDER}
    out.update(
        threshold=threshold,
        n_cases=int(y.size),
        n_patients=int(pd.unique(patients).size),
        n_positive=int(y.sum()),
    )
    return out


def _outcomes(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return np.where(
        predicted == 1, np.where(y == 1, "TP", "FP"), np.where(y == 1, "FN", "TN")
    ).astype(object)


def _jsonable(obj: Any) -> Any:
    """Plain-Python copy of obj with NaN/inf as None, so json.dumps(allow_nan=False) works."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def evaluate_classification(
    predictions: pd.DataFrame,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    n_calibration_bins: int = 10,
) -> EvaluationResult:
    """Metrics, per-case table and curve data for a k-fold study with a held-out test set.

    ``predictions``: see the module docstring; validated by ``validate_predictions``.
    The test prediction is the fold ensemble, the mean of the k fold models'
    probabilities. The operating threshold maximises Youden's J on the pooled
    out-of-fold validation predictions and is then fixed. CIs: percentile bootstrap,
    ``n_boot`` replicates resampling patients (all of a patient's cases together),
    level 1 - alpha; replicates where a metric is undefined are skipped and counted in
    its "n_boot_valid". NaN values (e.g. an undefined per-fold AUROC) become None.

    ``metrics`` keys:
      ensemble_test / out_of_fold_val: {auroc, auprc, accuracy, sensitivity,
        specificity, ppv, npv, f1, brier, ece: {value, ci_low, ci_high, n_boot_valid},
        threshold, threshold_source, n_cases, n_patients, n_positive}; ensemble_test
        also n_folds. out_of_fold_val's threshold is its own Youden optimum (the same
        number), so its threshold-dependent metrics are optimistic.
      folds: [{fold, val_auroc, test_auroc, threshold (Youden on that fold's val),
        test_sensitivity, test_specificity (fold model on test, at that threshold),
        n_val, n_test}]
      settings: {n_boot, seed, alpha, n_calibration_bins, bootstrap_unit, ci_method}
    ``per_case`` columns: series_pid, patient_pid, label, split, fold (-1 for test),
      prob (val: the fold model's; test: ensemble mean), prob_fold<k> (test rows only,
      NaN on val rows), predicted (prob >= threshold), outcome (TP/FP/TN/FN).
    ``curves``: see ``_curves``.
    """
    df = validate_predictions(predictions)
    folds = sorted(int(k) for k in set(df[FOLD]))

    val = df[df[SPLIT] == SPLIT_VAL].sort_values([FOLD, SERIES_PID]).reset_index(drop=True)
    test_long = df[df[SPLIT] == SPLIT_TEST]
    wide = test_long.pivot(index=SERIES_PID, columns=FOLD, values=PROB)[folds].sort_index()
    test = (
        test_long.drop_duplicates(SERIES_PID)
        .set_index(SERIES_PID)
        .loc[wide.index, [PATIENT_PID, LABEL]]
        .reset_index()
    )
    test[PROB] = wide.to_numpy().mean(axis=1)

    y_val, p_val = val[LABEL].to_numpy(), val[PROB].to_numpy()
    y_test, p_test = test[LABEL].to_numpy(), test[PROB].to_numpy()
    threshold = M.youden_threshold(y_val, p_val)

    common = {"n_boot": n_boot, "seed": seed, "alpha": alpha, "n_bins": n_calibration_bins}
    ens = _metric_set(y_test, p_test, test[PATIENT_PID].to_numpy(), threshold, **common)
    ens["threshold_source"] = THRESHOLD_FROM_VAL
    ens["n_folds"] = len(folds)
    oof = _metric_set(y_val, p_val, val[PATIENT_PID].to_numpy(), threshold, **common)
    oof["threshold_source"] = THRESHOLD_OWN

    fold_rows = []
    for k in folds:
        vk = val[val[FOLD] == k]
        yk, pk = vk[LABEL].to_numpy(), vk[PROB].to_numpy()
        tk = M.youden_threshold(yk, pk)
        p_test_k = wide[k].to_numpy()
        at_k = M.binary_metrics_at(y_test, p_test_k, tk)
        fold_rows.append(
            {
                "fold": k,
                "val_auroc": M.roc_auc(yk, pk),
                "test_auroc": M.roc_auc(y_test, p_test_k),
                "threshold": tk,
                "test_sensitivity": at_k["sensitivity"],
                "test_specificity": at_k["specificity"],
                "n_val": int(yk.size),
                "n_test": int(y_test.size),
            }
        )

    metrics = _jsonable(
        {
            "ensemble_test": ens,
            "out_of_fold_val": oof,
            "folds": fold_rows,
            "settings": {
                "n_boot": n_boot,
                "seed": seed,
                "alpha": alpha,
                "n_calibration_bins": n_calibration_bins,
                "bootstrap_unit": PATIENT_PID,
                "ci_method": "percentile",
            },
        }
    )

    per_case = _per_case(val, test, wide, folds, threshold)
    curves = _curves(
        test,
        wide,
        folds,
        threshold,
        ens,
        seed=seed,
        n_boot=n_boot,
        alpha=alpha,
        n_bins=n_calibration_bins,
    )
    return EvaluationResult(metrics=metrics, per_case=per_case, curves=curves)


def _per_case(
    val: pd.DataFrame, test: pd.DataFrame, wide: pd.DataFrame, folds: list[int], threshold: float
) -> pd.DataFrame:
    fold_cols = [prob_fold_column(k) for k in folds]
    v = val[[SERIES_PID, PATIENT_PID, LABEL, SPLIT, FOLD, PROB]].copy()
    for col in fold_cols:
        v[col] = np.nan
    t = test[[SERIES_PID, PATIENT_PID, LABEL]].copy()
    t[SPLIT] = SPLIT_TEST
    t[FOLD] = TEST_FOLD
    t[PROB] = test[PROB].to_numpy()
    for k, col in zip(folds, fold_cols, strict=True):
        t[col] = wide[k].to_numpy()
    out = pd.concat([v, t], ignore_index=True)
    out[FOLD] = out[FOLD].astype(np.int64)
    predicted = (out[PROB].to_numpy() >= threshold).astype(np.int64)
    out[PREDICTED] = predicted
    out[OUTCOME] = _outcomes(out[LABEL].to_numpy(), predicted)
    return out


def _curves(
    test: pd.DataFrame,
    wide: pd.DataFrame,
    folds: list[int],
    threshold: float,
    ens: dict[str, Any],
    *,
    seed: int,
    n_boot: int,
    alpha: float,
    n_bins: int,
) -> dict[str, Any]:
    """Everything the figures draw, for the ensemble on the test set.

    Keys: threshold, threshold_source, ci_level, n_cases, n_patients, n_positive,
    operating_point {fpr, tpr, threshold}, roc {fpr, tpr, auroc, band {fpr, tpr, tpr_low,
    tpr_high, n_boot_valid}}, roc_folds [{fold, fpr, tpr, auroc}], pr {recall,
    precision, auprc, prevalence}, calibration {bin_lower, bin_upper, mean_predicted,
    observed_rate, count, ece, brier}, confusion {matrix [[tn, fp], [fn, tp]],
    row_labels, col_labels, threshold}; auroc/auprc/ece/brier are {value, ci_low,
    ci_high, n_boot_valid} blocks copied from the metrics.
    """
    y = test[LABEL].to_numpy()
    p = test[PROB].to_numpy()
    fpr, tpr, _ = M.roc_curve(y, p)
    band = M.roc_band(
        y, p, groups=test[PATIENT_PID].to_numpy(), n_boot=n_boot, seed=seed, alpha=alpha
    )
    precision, recall, _ = M.precision_recall_curve(y, p)
    rel = M.reliability_bins(y, p, n_bins=n_bins)
    tn, fp, fn, tp = M.confusion_at(y, p, threshold)
    roc_folds = []
    for k in folds:
        fk, tk, _ = M.roc_curve(y, wide[k].to_numpy())
        roc_folds.append({"fold": k, "fpr": fk, "tpr": tk, "auroc": M.roc_auc(y, wide[k])})
    return _jsonable(
        {
            "threshold": threshold,
            "threshold_source": THRESHOLD_FROM_VAL,
            "ci_level": 1 - alpha,
            "n_cases": ens["n_cases"],
            "n_patients": ens["n_patients"],
            "n_positive": ens["n_positive"],
            "operating_point": {
                "fpr": fp / (fp + tn),
                "tpr": tp / (tp + fn),
                "threshold": threshold,
            },
            "roc": {
                "fpr": fpr,
                "tpr": tpr,
                "auroc": ens["auroc"],
                "band": {
                    "fpr": band["fpr"],
                    "tpr": band["tpr"],
                    "tpr_low": band["tpr_low"],
                    "tpr_high": band["tpr_high"],
                    "n_boot_valid": band["n_valid"],
                },
            },
            "roc_folds": roc_folds,
            "pr": {
                "recall": recall,
                "precision": precision,
                "auprc": ens["auprc"],
                "prevalence": float(y.mean()),
            },
            "calibration": {**rel, "ece": ens["ece"], "brier": ens["brier"]},
            "confusion": {
                "matrix": [[tn, fp], [fn, tp]],
                "row_labels": ["negative (label 0)", "positive (label 1)"],
                "col_labels": ["predicted negative", "predicted positive"],
                "threshold": threshold,
            },
        }
    )


# --------------------------------------------------------------------- outputs
def summary_table(metrics: dict[str, Any], evaluation: str = "ensemble_test") -> pd.DataFrame:
    """Flat table (metric, value, ci_low, ci_high) of one evaluation in ``metrics``.

    ``evaluation`` is "ensemble_test" (the headline) or "out_of_fold_val". Rows: the
    metrics with CIs in report order, then threshold, n_cases, n_patients, n_positive
    with empty (NaN) CI columns.
    """
    if evaluation not in ("ensemble_test", "out_of_fold_val"):
        raise ValueError(
            f"evaluation must be 'ensemble_test' or 'out_of_fold_val', not {evaluation!r}"
        )
    block = metrics[evaluation]
    rows = []
    for name, item in block.items():
        if isinstance(item, dict) and "value" in item:
            rows.append((name, item["value"], item["ci_low"], item["ci_high"]))
    for name in ("threshold", "n_cases", "n_patients", "n_positive"):
        if name in block:
            rows.append((name, block[name], None, None))
    table = pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])
    for col in ("value", "ci_low", "ci_high"):
        table[col] = pd.to_numeric(table[col]).astype(float)
    return table


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """Open a temporary sibling of path for writing; rename it onto path on success.

    A crash (or a Snakemake kill) mid-write then never leaves a truncated file that
    looks complete.
    """
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8", newline="") as fh:
        yield fh


def _write(path: Path, writer: Callable[[IO[str]], None]) -> Path:
    with _atomic(path) as fh:
        writer(fh)
    return path


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write metrics.json, metrics.tsv, per_case.tsv and curves.json into out_dir.

    Each file is written atomically (temporary file + os.replace). JSON is strict
    (no NaN; undefined values are null). TSVs are tab-separated with NaN as "NA".
    Returns {file name: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump_json(obj: Any) -> Callable[[IO[str]], None]:
        return lambda fh: fh.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")

    def dump_tsv(frame: pd.DataFrame) -> Callable[[IO[str]], None]:
        return lambda fh: frame.to_csv(fh, sep="\t", index=False, na_rep="NA")

    writers = {
        EVAL_METRICS_JSON: dump_json(result.metrics),
        EVAL_METRICS_TSV: dump_tsv(summary_table(result.metrics)),
        EVAL_PER_CASE: dump_tsv(result.per_case),
        EVAL_CURVES: dump_json(result.curves),
    }
    return {name: _write(out / name, w) for name, w in writers.items()}
