"""radflow.metrics: values against scikit-learn, hand-computed cases, bootstrap behaviour."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn import calibration as skcal
from sklearn import metrics as sk

from radflow import metrics as M


def _random(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.8)))
    return y, p


def _tie_heavy(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    # Five distinct scores, several exactly on calibration bin edges.
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p = np.clip(rng.integers(0, 5, n) + y * rng.integers(0, 2, n), 0, 4) / 4
    return y, p


DATASETS = {
    **{f"random{s}": _random(s) for s in range(3)},
    **{f"ties{s}": _tie_heavy(s) for s in range(3)},
    "tiny": (np.array([0, 1, 1, 0, 1]), np.array([0.3, 0.3, 0.9, 0.1, 0.3])),
    "all_tied": (np.array([0, 1, 0, 1, 1]), np.full(5, 0.5)),
}


@pytest.fixture(params=sorted(DATASETS))
def data(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    return DATASETS[request.param]


# ------------------------------------------------------------- vs scikit-learn
def test_roc_auc_matches_sklearn(data):
    y, p = data
    assert M.roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(data, drop):
    y, p = data
    fpr, tpr, thr = M.roc_curve(y, p, drop_intermediate=drop)
    s_fpr, s_tpr, s_thr = sk.roc_curve(y, p, drop_intermediate=drop)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)
    np.testing.assert_array_equal(thr, s_thr)


@pytest.mark.parametrize("drop", [True, False])
def test_precision_recall_curve_matches_sklearn(data, drop):
    y, p = data
    prec, rec, thr = M.precision_recall_curve(y, p, drop_intermediate=drop)
    s_prec, s_rec, s_thr = sk.precision_recall_curve(y, p, drop_intermediate=drop)
    np.testing.assert_allclose(prec, s_prec)
    np.testing.assert_allclose(rec, s_rec)
    np.testing.assert_array_equal(thr, s_thr)


def test_average_precision_matches_sklearn(data):
    y, p = data
    assert M.average_precision(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)


def test_brier_matches_sklearn(data):
    y, p = data
    assert M.brier_score(y, p) == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_confusion_and_binary_metrics_match_sklearn(data, threshold):
    y, p = data
    pred = (p >= threshold).astype(int)
    assert M.confusion_at(y, p, threshold) == tuple(
        int(v) for v in sk.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    )
    got = M.binary_metrics_at(y, p, threshold)
    nan = np.nan  # sklearn's zero_division value for undefined ratios
    expected = {
        "accuracy": sk.accuracy_score(y, pred),
        "sensitivity": sk.recall_score(y, pred, zero_division=nan),
        "specificity": sk.recall_score(y, pred, pos_label=0, zero_division=nan),
        "ppv": sk.precision_score(y, pred, zero_division=nan),
        "npv": sk.precision_score(y, pred, pos_label=0, zero_division=nan),
        "f1": sk.f1_score(y, pred, zero_division=nan),
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, err_msg=key)


def test_reliability_bins_match_sklearn_calibration_curve(data):
    y, p = data
    bins = M.reliability_bins(y, p, n_bins=10)
    s_obs, s_pred = skcal.calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["observed_rate"][filled], s_obs)
    np.testing.assert_allclose(bins["mean_predicted"][filled], s_pred)
    assert bins["count"].sum() == y.size
    assert np.isnan(bins["mean_predicted"][~filled]).all()
    np.testing.assert_allclose(bins["bin_lower"], np.arange(10) / 10)
    np.testing.assert_allclose(bins["bin_upper"], np.arange(1, 11) / 10)


def test_ece_equals_weighted_gap_of_reliability_bins(data):
    y, p = data
    bins = M.reliability_bins(y, p, n_bins=7)
    filled = bins["count"] > 0
    gap = np.abs(bins["observed_rate"] - bins["mean_predicted"])[filled]
    expected = np.sum(bins["count"][filled] / y.size * gap)
    assert M.expected_calibration_error(y, p, n_bins=7) == pytest.approx(expected, abs=1e-12)


def test_youden_matches_brute_force(data):
    y, p = data
    n_pos, n_neg = y.sum(), (1 - y).sum()
    best_t, best_j = None, None
    for t in np.unique(p)[::-1]:  # highest first: strict > keeps the higher on ties
        called = p >= t
        tp, fp = np.sum(called & (y == 1)), np.sum(called & (y == 0))
        j = tp * n_neg - fp * n_pos
        if best_j is None or j > best_j:
            best_t, best_j = t, j
    lower = np.unique(p)[np.unique(p) < best_t]
    expected = (best_t + lower.max()) / 2 if lower.size else best_t
    assert M.youden_threshold(y, p) == pytest.approx(expected)


# ----------------------------------------------------------------- hand cases
Y6 = np.array([0, 0, 1, 1, 1, 0])
P6 = np.array([0.1, 0.2, 0.7, 0.8, 0.4, 0.6])


def test_brier_by_hand():
    # squared errors .01 .04 .09 .04 .36 .36 -> 0.9 / 6
    assert M.brier_score(Y6, P6) == pytest.approx(0.15)


def test_ece_by_hand():
    # 2 bins: [0, .5] holds .1 .2 .4 (1 positive, sum p .7) and (.5, 1] holds .7 .8 .6
    # (2 positives, sum p 2.1): ECE = (|1 - .7| + |2 - 2.1|) / 6 = 1/15.
    assert M.expected_calibration_error(Y6, P6, n_bins=2) == pytest.approx(1 / 15)
    bins = M.reliability_bins(Y6, P6, n_bins=2)
    np.testing.assert_allclose(bins["count"], [3, 3])
    np.testing.assert_allclose(bins["mean_predicted"], [0.7 / 3, 0.7])
    np.testing.assert_allclose(bins["observed_rate"], [1 / 3, 2 / 3])


def test_calibration_bins_are_right_closed():
    bins = M.reliability_bins([0, 1, 1], [0.0, 0.5, 1.0], n_bins=2)
    np.testing.assert_allclose(bins["count"], [2, 1])  # 0.5 belongs to [0, 0.5]


def test_auc_by_hand_with_ties():
    # (pos, neg) pairs: .9 beats .3 and .1; .3 ties .3 (counts 1/2) and beats .1 -> 3.5 / 4
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.3, 0.3, 0.1])
    assert M.roc_auc(y, p) == pytest.approx(3.5 / 4)


def test_youden_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.35, 0.9])
    # J: t=.9 -> 1/3, t=.8 -> 2/3, t=.4 -> 1/3, t=.35 -> 1/3, t=.1 -> 0; the threshold
    # sits midway between .8 and the next lower score .4
    assert M.youden_threshold(y, p) == pytest.approx(0.6)
    called = p >= M.youden_threshold(y, p)
    assert called.tolist() == (p >= 0.8).tolist()


def test_youden_ties_go_to_higher_threshold():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.4, 0.6, 0.8])
    # J = 1/2 at both 0.8 (tp 1, fp 0) and 0.4 (tp 2, fp 1): 0.8 wins, midway to 0.6
    assert M.youden_threshold(y, p) == pytest.approx(0.7)


def test_youden_threshold_sits_in_the_middle_of_a_separating_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.6, 0.7, 0.9])
    assert M.youden_threshold(y, p) == pytest.approx(0.4)


def test_undefined_metrics_are_nan_not_errors():
    y = np.zeros(4, int)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert np.isnan(M.roc_auc(y, p))
    assert np.isnan(M.average_precision(y, p))
    assert np.isnan(M.youden_threshold(y, p))
    m = M.binary_metrics_at(y, p, 0.9)
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    assert np.isnan(m["sensitivity"]) and np.isnan(m["ppv"]) and np.isnan(m["f1"])
    fpr, tpr, _ = M.roc_curve(y, p)
    assert np.isnan(tpr).all() and not np.isnan(fpr).any()


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 2], [0.1, 0.2], "only 0 and 1"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "y_score has 2"),
    ],
)
def test_invalid_inputs_raise(y, p, message):
    with pytest.raises(ValueError, match=message):
        M.roc_auc(y, p)


def test_calibration_rejects_scores_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error([0, 1], [0.2, 1.5])


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_is_deterministic_for_a_seed():
    y, p = _random(0)
    a = M.bootstrap_ci(M.roc_auc, y, p, n_boot=300, seed=7)
    b = M.bootstrap_ci(M.roc_auc, y, p, n_boot=300, seed=7)
    c = M.bootstrap_ci(M.roc_auc, y, p, n_boot=300, seed=8)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.point == M.roc_auc(y, p)


def test_bootstrap_ci_contains_point_and_narrows_with_more_data():
    small = M.bootstrap_ci(M.roc_auc, *_random(1, n=150), n_boot=500)
    large = M.bootstrap_ci(M.roc_auc, *_random(1, n=5000), n_boot=500)
    for r in (small, large):
        assert r.low <= r.point <= r.high
        assert r.n_valid == 500
    assert (large.high - large.low) < 0.5 * (small.high - small.low)


def test_bootstrap_percentiles_of_a_case_count():
    # Metric = number of cases: without groups every replicate has exactly n cases.
    y, p = _random(2, n=50)
    r = M.bootstrap_ci(lambda yy, pp: float(yy.size), y, p, n_boot=100)
    assert (r.point, r.low, r.high) == (50, 50, 50)


def test_bootstrap_skips_and_counts_undefined_replicates():
    y = np.array([1] + [0] * 19)
    p = np.linspace(0.05, 0.95, 20)
    r = M.bootstrap_ci(M.roc_auc, y, p, n_boot=400, seed=0)
    # P(replicate has no positive) = (19/20)^20 ~ 0.36
    assert 200 < r.n_valid < 330
    assert np.isfinite(r.low) and np.isfinite(r.high)


def test_cluster_bootstrap_resamples_patients_with_all_their_cases():
    # Patient "pair" has two studies, marked by score 0.123; all others have one.
    y, p = _random(3, n=40)
    p = p.copy()
    p[[5, 17]] = 0.123
    groups = np.array([f"pat{i:02d}" for i in range(40)], dtype=object)
    groups[17] = groups[5]

    def recorder(seen: list[int]):
        def metric(yy: np.ndarray, pp: np.ndarray) -> float:
            seen.append(int(np.sum(pp == 0.123)))
            return float(yy.size)

        return metric

    with_groups: list[int] = []
    r = M.bootstrap_ci(recorder(with_groups), y, p, groups=groups, n_boot=500, seed=1)
    counts = np.array(with_groups[1:])  # first call is the point estimate on full data
    assert with_groups[0] == 2
    assert np.all(counts % 2 == 0), "a study was drawn without its sibling"
    assert (counts == 0).any() and (counts >= 4).any()
    assert r.low < 40 < r.high  # 39 patients drawn, replicate size varies with the pair

    without: list[int] = []
    M.bootstrap_ci(recorder(without), y, p, n_boot=500, seed=1)
    assert (np.array(without[1:]) % 2 == 1).any()


def test_bootstrap_cis_shares_replicates_and_matches_single_calls():
    y, p = _random(4)
    many = M.bootstrap_cis({"auc": M.roc_auc, "brier": M.brier_score}, y, p, n_boot=200, seed=3)
    assert many["auc"] == M.bootstrap_ci(M.roc_auc, y, p, n_boot=200, seed=3)
    assert many["brier"] == M.bootstrap_ci(M.brier_score, y, p, n_boot=200, seed=3)


def test_case_bootstrap_draws_the_cases_bootstrap_ci_draws():
    # bootstrap_ci orders cases by score; with scores already ascending the case
    # positions it draws are the ones bootstrap_case_ci hands to its statistic.
    y, p = _random(5, n=120)
    order = np.argsort(p, kind="stable")
    y, p = y[order], p[order]
    groups = np.arange(120) // 3  # patients with three studies each
    for g in (None, groups):
        by_case = M.bootstrap_case_ci(lambda i: M.roc_auc(y[i], p[i]), 120, groups=g, seed=2)
        assert by_case == M.bootstrap_ci(M.roc_auc, y, p, groups=g, seed=2)


def test_bootstrap_argument_checks():
    y, p = _random(0, n=20)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(M.roc_auc, y, p, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci(M.roc_auc, y, p, alpha=1.5)
    with pytest.raises(ValueError, match="groups"):
        M.bootstrap_ci(M.roc_auc, y, p, groups=np.arange(3))


def test_bootstrap_is_fast_enough():
    y, p = _random(5, n=10_000)
    groups = np.arange(10_000) // 2
    start = time.perf_counter()
    r = M.bootstrap_ci(M.roc_auc, y, p, groups=groups, n_boot=2000)
    assert time.perf_counter() - start < 20  # ~1 s on 2 cores; generous for CI machines
    assert r.n_valid == 2000


# -------------------------------------------------------------------- ROC band
def test_roc_band_interpolation_by_hand():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.4, 0.6, 0.8])
    # ROC: (0,0) (0,.5) (.5,.5) (.5,1) (1,1); vertical steps take their upper end
    band = M.roc_band(y, p, n_boot=20, fpr_grid=[0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(band["tpr"], [0.5, 0.5, 1, 1, 1])
    # Tied scores give a diagonal segment, interpolated linearly.
    band = M.roc_band([0, 1], [0.5, 0.5], n_boot=20, fpr_grid=[0, 0.25, 1])
    np.testing.assert_allclose(band["tpr"], [0, 0.25, 1])


def test_roc_band_brackets_the_curve():
    y, p = _random(6, n=300)
    band = M.roc_band(y, p, n_boot=300, seed=0)
    assert band["fpr"].shape == band["tpr"].shape == band["tpr_low"].shape == (101,)
    assert band["n_valid"] == 300
    assert np.all(band["tpr_low"] <= band["tpr_high"])
    inside = (band["tpr_low"] - 1e-12 <= band["tpr"]) & (band["tpr"] <= band["tpr_high"] + 1e-12)
    assert inside.mean() > 0.95
    assert band["tpr"][-1] == 1 and band["tpr_low"][-1] == 1
    # The point curve on the grid agrees with the exact curve where it has no steps.
    fpr, tpr, _ = M.roc_curve(y, p)
    grid_tpr = band["tpr"][50]
    assert tpr[fpr <= 0.5].max() <= grid_tpr + 1e-12
    assert grid_tpr <= tpr[fpr > 0.5].min() + 1e-12
    # Same seed, same band.
    again = M.roc_band(y, p, n_boot=300, seed=0)
    np.testing.assert_array_equal(again["tpr_low"], band["tpr_low"])
