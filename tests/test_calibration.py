import numpy as np
import pytest

from radflow.calibration import apply_platt, fit_platt
from radflow.metrics import brier_score, roc_auc


def test_platt_is_monotone_and_improves_a_miscalibrated_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    true_p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.2, 400), 0.01, 0.99)
    overconfident = 1 / (1 + np.exp(-3 * np.log(true_p / (1 - true_p))))
    a, b = fit_platt(y, overconfident)
    calibrated = apply_platt(overconfident, a, b)
    assert roc_auc(y, calibrated) == pytest.approx(roc_auc(y, overconfident))
    assert 0 < a < 1  # it has to shrink an overconfident model's logits
    assert brier_score(y, calibrated) < brier_score(y, overconfident)


def test_platt_stays_finite_on_a_perfectly_separated_fold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.01, 0.02, 0.03, 0.97, 0.98, 0.99])
    a, b = fit_platt(y, p)
    out = apply_platt(p, a, b)
    assert np.isfinite([a, b]).all()
    # Platt's smoothed targets: 1/(n-+2)=0.2 and (n++1)/(n++2)=0.8 bound the fit
    assert out.max() < 0.95 and out.min() > 0.05


def test_single_class_fold_is_left_alone():
    assert fit_platt(np.ones(5), np.linspace(0.1, 0.9, 5)) == (1.0, 0.0)
