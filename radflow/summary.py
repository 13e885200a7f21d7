"""Print a study's headline result: `python -m radflow.summary results/evaluate/metrics.json`."""

from __future__ import annotations

import json
import sys


def headline(metrics: dict) -> str:
    ens = metrics["ensemble_test"]
    lines = [
        f"Ensemble of {ens['n_folds']} fold models on the held-out test set "
        f"({ens['n_cases']} images, {ens['n_patients']} patients, {ens['n_positive']} positive):"
    ]
    for name in ("auroc", "auprc", "sensitivity", "specificity", "brier", "ece"):
        m = ens[name]
        lines.append(
            f"  {name:<12} {m['value']:.3f}  (95% CI {m['ci_low']:.3f}-{m['ci_high']:.3f})"
        )
    lines.append(f"  threshold    {ens['threshold']:.3f}  (Youden on out-of-fold validation)")
    return "\n".join(lines)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "results/evaluate/metrics.json"
    with open(path) as fh:
        print(headline(json.load(fh)))
