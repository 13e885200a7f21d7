"""Post-hoc probability calibration of a fold model on its own validation fold.

Fold models trained on small cohorts rank cases well but disagree on the probability
scale (one fold's best threshold may be 0.02, another's 0.95). Averaging such outputs
and applying a threshold chosen on pooled validation predictions then misbehaves.
Platt scaling (Platt 1999) refits p = sigmoid(a * logit(p_raw) + b) on the fold's
validation predictions, with Platt's smoothed targets (N+ + 1)/(N+ + 2) and
1/(N- + 2) instead of 1 and 0, which keeps a and b finite when a small validation
fold is perfectly separated. It is monotone, so it never changes a fold's ranking
(its AUROC), only its scale. The test set is never used.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

_EPS = 1e-12  # clip only exact 0 and 1; a coarser clip would create ties


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float]:
    """(a, b) of Platt scaling fitted on validation labels and raw probabilities."""
    y = np.asarray(y_true, int)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0  # nothing to calibrate against: identity
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    z = _logit(y_score)

    def loss(params):
        a, b = params
        s = a * z + b
        # binary cross-entropy with soft targets, written stably via logaddexp
        value = np.sum(np.logaddexp(0, s) - target * s)
        sig = 1 / (1 + np.exp(-s))
        grad = np.array([np.sum((sig - target) * z), np.sum(sig - target)])
        return value, grad

    result = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in result.x)
    return a, b


def apply_platt(y_score: np.ndarray, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities for raw probabilities `y_score`."""
    s = a * _logit(y_score) + b
    return 1 / (1 + np.exp(-s))
