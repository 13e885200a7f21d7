"""radflow.evaluate: ensemble, threshold provenance, per-case table, validation, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

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
from radflow.evaluate import (
    evaluate_classification,
    prob_fold_column,
    summary_table,
    write_evaluation,
)

N_BOOT = 100


def make_predictions(seed: int = 0, n_folds: int = 3, n_dev: int = 60, n_test: int = 30):
    """Predictions as the training stage writes them; patients have 1 or 2 studies."""
    rng = np.random.default_rng(seed)
    rows = []

    def patients(prefix: str, n: int):
        for i in range(n):
            label = int(rng.random() < 0.4)
            for s in range(1 + int(rng.random() < 0.5)):
                yield f"{prefix}-ser{i:03d}-{s}", f"{prefix}-pat{i:03d}", label

    def score(label: int) -> float:
        return float(np.clip(rng.normal(0.35 + 0.3 * label, 0.18), 0, 1))

    for series, patient, label in patients("dev", n_dev):
        fold = int(patient[-3:]) % n_folds  # patient-level folds
        rows.append((series, patient, label, fold, SPLIT_VAL, score(label)))
    for series, patient, label in patients("test", n_test):
        for fold in range(n_folds):
            rows.append((series, patient, label, fold, SPLIT_TEST, score(label)))
    return pd.DataFrame(rows, columns=[SERIES_PID, PATIENT_PID, LABEL, FOLD, SPLIT, PROB])


@pytest.fixture(scope="module")
def preds() -> pd.DataFrame:
    return make_predictions()


@pytest.fixture(scope="module")
def result(preds):
    return evaluate_classification(preds, n_boot=N_BOOT, seed=1)


# ------------------------------------------------------------------- ensemble
def test_ensemble_is_mean_of_fold_probabilities(preds, result):
    test_rows = result.per_case[result.per_case[SPLIT] == SPLIT_TEST].set_index(SERIES_PID)
    wide = preds[preds[SPLIT] == SPLIT_TEST].pivot(index=SERIES_PID, columns=FOLD, values=PROB)
    wide = wide.loc[test_rows.index]
    np.testing.assert_allclose(test_rows[PROB], wide.mean(axis=1))
    for k in range(3):
        np.testing.assert_allclose(test_rows[prob_fold_column(k)], wide[k])
    assert (test_rows[FOLD] == TEST_FOLD).all()


def test_metric_values_match_the_metric_functions(preds, result):
    pc = result.per_case
    test = pc[pc[SPLIT] == SPLIT_TEST]
    val = pc[pc[SPLIT] == SPLIT_VAL]
    ens, oof = result.metrics["ensemble_test"], result.metrics["out_of_fold_val"]
    t = ens["threshold"]
    assert ens["auroc"]["value"] == pytest.approx(M.roc_auc(test[LABEL], test[PROB]))
    assert ens["auprc"]["value"] == pytest.approx(M.average_precision(test[LABEL], test[PROB]))
    assert ens["brier"]["value"] == pytest.approx(M.brier_score(test[LABEL], test[PROB]))
    at = M.binary_metrics_at(test[LABEL], test[PROB], t)
    for name in ("accuracy", "sensitivity", "specificity", "f1"):
        assert ens[name]["value"] == pytest.approx(at[name])
    assert oof["auroc"]["value"] == pytest.approx(M.roc_auc(val[LABEL], val[PROB]))
    assert ens["n_cases"] == test[SERIES_PID].nunique() == len(test)
    assert ens["n_patients"] == test[PATIENT_PID].nunique()
    assert ens["n_positive"] == int(test[LABEL].sum())
    assert ens["n_folds"] == 3
    for name in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "brier", "ece"):
        block = ens[name]
        assert block["ci_low"] <= block["value"] <= block["ci_high"], name
        assert 0 < block["n_boot_valid"] <= N_BOOT
    assert result.metrics["settings"] == {
        "n_boot": N_BOOT,
        "seed": 1,
        "alpha": 0.05,
        "n_calibration_bins": 10,
        "bootstrap_unit": PATIENT_PID,
        "ci_method": "percentile",
    }


def test_per_fold_entries(preds, result):
    folds = result.metrics["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    val = preds[preds[SPLIT] == SPLIT_VAL]
    for f in folds:
        vk = val[val[FOLD] == f["fold"]]
        tk = preds[(preds[SPLIT] == SPLIT_TEST) & (preds[FOLD] == f["fold"])]
        assert f["val_auroc"] == pytest.approx(M.roc_auc(vk[LABEL], vk[PROB]))
        assert f["test_auroc"] == pytest.approx(M.roc_auc(tk[LABEL], tk[PROB]))
        assert f["threshold"] == M.youden_threshold(vk[LABEL], vk[PROB])
        at = M.binary_metrics_at(tk[LABEL], tk[PROB], f["threshold"])
        assert f["test_sensitivity"] == pytest.approx(at["sensitivity"])
        assert f["test_specificity"] == pytest.approx(at["specificity"])
        assert (f["n_val"], f["n_test"]) == (len(vk), len(tk))
    assert sum(f["n_val"] for f in folds) == len(val)


def test_per_case_table(preds, result):
    pc = result.per_case
    assert list(pc.columns) == [
        SERIES_PID,
        PATIENT_PID,
        LABEL,
        SPLIT,
        FOLD,
        PROB,
        *(prob_fold_column(k) for k in range(3)),
        PREDICTED,
        OUTCOME,
    ]
    n_val = int((preds[SPLIT] == SPLIT_VAL).sum())
    n_test = preds.loc[preds[SPLIT] == SPLIT_TEST, SERIES_PID].nunique()
    assert len(pc) == n_val + n_test
    t = result.metrics["ensemble_test"]["threshold"]
    np.testing.assert_array_equal(pc[PREDICTED], (pc[PROB] >= t).astype(int))
    expected = np.select(
        [
            (pc[LABEL] == 1) & (pc[PREDICTED] == 1),
            (pc[LABEL] == 0) & (pc[PREDICTED] == 1),
            (pc[LABEL] == 1) & (pc[PREDICTED] == 0),
        ],
        ["TP", "FP", "FN"],
        "TN",
    )
    np.testing.assert_array_equal(pc[OUTCOME].to_numpy(dtype=str), expected)
    assert pc.loc[pc[SPLIT] == SPLIT_VAL, prob_fold_column(0)].isna().all()


def test_curves_are_consistent_with_metrics(result):
    c, ens = result.curves, result.metrics["ensemble_test"]
    test = result.per_case[result.per_case[SPLIT] == SPLIT_TEST]
    counts = test[OUTCOME].value_counts()
    tn, fp, fn, tp = (int(counts.get(k, 0)) for k in ("TN", "FP", "FN", "TP"))
    assert c["confusion"]["matrix"] == [[tn, fp], [fn, tp]]
    assert c["threshold"] == c["confusion"]["threshold"] == ens["threshold"]
    assert c["operating_point"]["tpr"] == pytest.approx(ens["sensitivity"]["value"])
    assert c["operating_point"]["fpr"] == pytest.approx(1 - ens["specificity"]["value"])
    fpr, tpr, _ = M.roc_curve(test[LABEL], test[PROB])
    np.testing.assert_allclose(c["roc"]["fpr"], fpr)
    np.testing.assert_allclose(c["roc"]["tpr"], tpr)
    assert c["roc"]["auroc"] == ens["auroc"]
    assert len(c["roc"]["band"]["fpr"]) == 101
    assert [f["fold"] for f in c["roc_folds"]] == [0, 1, 2]
    assert c["pr"]["prevalence"] == pytest.approx(test[LABEL].mean())
    assert sum(c["calibration"]["count"]) == len(test)
    assert c["calibration"]["ece"] == ens["ece"]
    assert c["ci_level"] == pytest.approx(0.95)


def test_results_are_strict_json(result):
    for obj in (result.metrics, result.curves):
        assert json.loads(json.dumps(obj, allow_nan=False)) == obj


def test_same_seed_same_result(preds, result):
    again = evaluate_classification(preds, n_boot=N_BOOT, seed=1)
    assert again.metrics == result.metrics
    assert again.curves == result.curves
    pd.testing.assert_frame_equal(again.per_case, result.per_case)


# ------------------------------------------------------------------ threshold
def test_threshold_comes_from_validation_not_test():
    # Val separates perfectly at 0.7; test separates perfectly at 0.3. Using val's
    # threshold on test misses the positives scored 0.3-0.6.
    rows = []
    val_scores = [(0, 0.1), (0, 0.2), (0, 0.3), (0, 0.5), (0, 0.6), (1, 0.7), (1, 0.8), (1, 0.9)]
    for i, (label, prob) in enumerate(val_scores * 2):
        rows.append((f"v{i}", f"vp{i}", label, i // 8, SPLIT_VAL, prob))  # a copy per fold
    test_scores = [(0, 0.1), (0, 0.2), (1, 0.3), (1, 0.4), (1, 0.5), (1, 0.6), (1, 0.8), (1, 0.9)]
    for i, (label, prob) in enumerate(test_scores):
        for fold in (0, 1):
            rows.append((f"t{i}", f"tp{i}", label, fold, SPLIT_TEST, prob))
    preds = pd.DataFrame(rows, columns=[SERIES_PID, PATIENT_PID, LABEL, FOLD, SPLIT, PROB])

    test = preds[(preds[SPLIT] == SPLIT_TEST) & (preds[FOLD] == 0)]
    assert M.youden_threshold(test[LABEL], test[PROB]) == pytest.approx(0.25)  # test's pick

    res = evaluate_classification(preds, n_boot=20)
    ens = res.metrics["ensemble_test"]
    assert ens["threshold"] == pytest.approx(0.65)  # midway between val's 0.6 and 0.7
    assert ens["threshold_source"] == "youden_out_of_fold_val"
    assert res.metrics["out_of_fold_val"]["threshold"] == pytest.approx(0.65)
    assert res.metrics["out_of_fold_val"]["threshold_source"] == "youden_on_this_set"
    assert ens["sensitivity"]["value"] == pytest.approx(2 / 6)
    assert ens["specificity"]["value"] == 1.0
    pc = res.per_case[res.per_case[SPLIT] == SPLIT_TEST]
    assert pc[PREDICTED].sum() == 2
    assert res.curves["confusion"]["matrix"] == [[2, 0], [4, 2]]
    assert [f["threshold"] for f in res.metrics["folds"]] == pytest.approx([0.65, 0.65])


# ----------------------------------------------------------------- validation
def _expect_error(preds: pd.DataFrame, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_classification(preds, n_boot=5)


def test_missing_column_is_named(preds):
    _expect_error(preds.drop(columns=[PROB]), r"lack column\(s\) \['prob'\]")
    _expect_error(preds.drop(columns=[PATIENT_PID, FOLD]), "'patient_pid', 'fold'")


def test_test_case_missing_from_a_fold_names_the_fold(preds):
    test_rows = preds.index[(preds[SPLIT] == SPLIT_TEST) & (preds[FOLD] == 1)]
    _expect_error(preds.drop(index=test_rows[:2]), r"fold 1 lacks predictions for 2 of")


def test_probability_outside_unit_interval_is_named(preds):
    bad = preds.copy()
    bad.loc[3, PROB] = 1.2
    _expect_error(bad, "column 'prob'.*1.2")
    bad.loc[3, PROB] = np.inf
    _expect_error(bad, "column 'prob'")


def test_dev_case_in_two_folds(preds):
    row = preds[preds[SPLIT] == SPLIT_VAL].iloc[[0]].copy()
    row[FOLD] = (row[FOLD] + 1) % 3
    _expect_error(pd.concat([preds, row]), r"is a 'val' case in folds \[\d, \d\]")


def test_other_structural_errors(preds):
    bad = preds.copy()
    bad.loc[0, SPLIT] = "dev"
    _expect_error(bad, "column 'split' has value")

    bad = preds.copy()
    bad.loc[0, LABEL] = 2
    _expect_error(bad, "column 'label' must be 0 or 1")

    bad = preds.copy()
    bad.loc[0, FOLD] = np.nan
    _expect_error(bad, "column 'fold' has 1 missing")

    bad = preds.copy()
    bad[FOLD] = bad[FOLD].astype(float)
    bad.loc[0, FOLD] = 0.5
    _expect_error(bad, "column 'fold' must hold integers")

    test_series = preds.loc[preds[SPLIT] == SPLIT_TEST, SERIES_PID].iloc[0]
    bad = preds.copy()
    bad.loc[(bad[SERIES_PID] == test_series) & (bad[FOLD] == 2), LABEL] ^= 1
    _expect_error(bad, "column 'label' differs between the rows of series")

    bad = pd.concat([preds, preds.iloc[[0]]])
    _expect_error(bad, "appears more than once")

    val_patient = preds.loc[preds[SPLIT] == SPLIT_VAL, PATIENT_PID].iloc[0]
    bad = preds.copy()
    bad.loc[bad[SPLIT] == SPLIT_TEST, PATIENT_PID] = val_patient
    _expect_error(bad, "both the validation folds and the test set")

    bad = preds.copy()
    bad.loc[bad[SPLIT] == SPLIT_TEST, LABEL] = 0
    _expect_error(bad, "pooled 'test' cases all have 'label' 0")

    _expect_error(preds.iloc[0:0], "no rows")
    _expect_error(preds[preds[SPLIT] == SPLIT_VAL], "no 'test' rows")


def test_fold_without_validation_rows(preds):
    bad = preds[~((preds[SPLIT] == SPLIT_VAL) & (preds[FOLD] == 2))]
    _expect_error(bad, "fold 2 has no 'val' rows")


def test_patient_split_across_validation_folds(preds):
    val = preds[preds[SPLIT] == SPLIT_VAL]
    twice = val[PATIENT_PID].value_counts()
    patient = twice.index[twice == 2][0]
    bad = preds.copy()
    idx = bad.index[(bad[PATIENT_PID] == patient)][0]
    bad.loc[idx, FOLD] = (bad.loc[idx, FOLD] + 1) % 3
    _expect_error(bad, f"patient '{patient}' has validation cases in folds")


def test_input_is_not_modified_and_extra_columns_are_ignored(preds):
    extended = preds.assign(extra="x").sample(frac=1, random_state=0)
    before = extended.copy()
    a = evaluate_classification(extended, n_boot=20, seed=4)
    pd.testing.assert_frame_equal(extended, before)
    b = evaluate_classification(preds, n_boot=20, seed=4)
    assert a.metrics == b.metrics  # row order does not matter


# -------------------------------------------------------------------- outputs
def test_summary_table(result):
    table = summary_table(result.metrics)
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    row = table.set_index("metric").loc["auroc"]
    assert row["value"] == result.metrics["ensemble_test"]["auroc"]["value"]
    assert row["ci_low"] == result.metrics["ensemble_test"]["auroc"]["ci_low"]
    assert list(table["metric"][:2]) == ["auroc", "auprc"]
    assert np.isnan(table.set_index("metric").loc["n_cases", "ci_low"])
    oof = summary_table(result.metrics, "out_of_fold_val").set_index("metric")
    assert oof.loc["auroc", "value"] == result.metrics["out_of_fold_val"]["auroc"]["value"]
    with pytest.raises(ValueError, match="evaluation"):
        summary_table(result.metrics, "folds")


def test_write_evaluation(result, tmp_path):
    out = tmp_path / "eval"
    paths = write_evaluation(result, out)
    assert set(paths) == {EVAL_METRICS_JSON, EVAL_METRICS_TSV, EVAL_PER_CASE, EVAL_CURVES}
    assert sorted(p.name for p in out.iterdir()) == sorted(paths)  # no temporary left
    assert json.loads((out / EVAL_METRICS_JSON).read_text()) == result.metrics
    assert json.loads((out / EVAL_CURVES).read_text()) == result.curves
    per_case = pd.read_csv(out / EVAL_PER_CASE, sep="\t")
    assert list(per_case.columns) == list(result.per_case.columns)
    np.testing.assert_allclose(per_case[PROB], result.per_case[PROB])
    table = pd.read_csv(out / EVAL_METRICS_TSV, sep="\t")
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    write_evaluation(result, out)  # overwriting is fine
    assert sorted(p.name for p in out.iterdir()) == sorted(paths)
