"""A study's headline result, for the terminal and for the README.

    python -m radflow.summary [results/evaluate/metrics.json]
    python -m radflow.summary results/evaluate/metrics.json --update-readme README.md

The second form rewrites the block between the README's `demo-result` markers from the
measured metrics, so the figures quoted there are never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- demo-result:start -->", "<!-- demo-result:end -->"
ROWS = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("brier", "Brier score"),
    ("ece", "expected calibration error"),
)


def segmentation_headline(metrics: dict) -> str:
    """The segmentation evaluation's summary (radflow.tasks.segmentation.evaluation):
    every region's mean Dice, HD95 and surface Dice with CIs, for the headline set."""
    kind = metrics["headline"]["set"]
    level = round(100 * (1 - metrics["alpha"]))
    rows = [r for r in metrics["summary"] if r["set"] == kind]
    n = rows[0]["n_cases"] if rows else 0
    lines = [f"Segmentation, {kind} ({n} cases), means with {level}% CIs (patient bootstrap):"]
    for region in dict.fromkeys(r["region"] for r in rows):
        cells = []
        for metric, label, fmt in (("dice", "Dice", ".3f"), ("hd95_mm", "HD95 mm", ".1f"),
                                   ("nsd", "surface Dice", ".3f")):  # fmt: skip
            r = next(r for r in rows if r["region"] == region and r["metric"] == metric)
            cells.append(f"{label} {r['mean']:{fmt}} ({r['ci_low']:{fmt}}-{r['ci_high']:{fmt}})")
        lines.append(f"  {region:<14} " + ", ".join(cells))
    return "\n".join(lines)


def localization_headline(metrics: dict) -> str:
    """The localisation evaluation's summary (radflow.tasks.localization.evaluation):
    LUNA16's seven sensitivities and CPM with bootstrap CIs, per evaluation set."""
    lines = []
    for name, s in metrics["sets"].items():
        lines.append(f"Localisation, {name} ({s['n_scans']} scans, {s['n_nodules']} nodules), "
                     "LUNA16 FROC with 95% CIs (bootstrap over scans):")  # fmt: skip
        for rate, sens, lo, hi in zip(s["fp_rates"], s["sensitivities"], s["ci_low"],
                                      s["ci_high"], strict=True):  # fmt: skip
            lines.append(
                f"  sensitivity at {rate:g} FP/scan".ljust(34) + f"{sens:.3f} ({lo:.3f}-{hi:.3f})"
            )
        lo, hi = s["cpm_ci_low"], s["cpm_ci_high"]
        lines.append("  CPM".ljust(34) + f"{s['cpm']:.3f} ({lo:.3f}-{hi:.3f})")
    return "\n".join(lines)


def headline(metrics: dict) -> str:
    if "sets" in metrics and "ensemble_test" not in metrics:
        return localization_headline(metrics)
    if "ensemble_test" not in metrics and "headline" in metrics:
        return segmentation_headline(metrics)
    ens = metrics["ensemble_test"]
    lines = [
        f"Ensemble of {ens['n_folds']} fold models on the held-out test set "
        f"({ens['n_cases']} images, {ens['n_patients']} patients, {ens['n_positive']} positive):"
    ]
    for name, _ in ROWS:
        m = ens[name]
        lines.append(
            f"  {name:<12} {m['value']:.3f}  (95% CI {m['ci_low']:.3f}-{m['ci_high']:.3f})"
        )
    lines.append(f"  threshold    {ens['threshold']:.3f}  (Youden on out-of-fold validation)")
    return "\n".join(lines)


def readme_block(metrics: dict) -> str:
    ens = metrics["ensemble_test"]
    level = round(100 * (1 - metrics["settings"]["alpha"]))
    lines = [
        f"| ensemble of {ens['n_folds']} fold models, held-out test set "
        f"({ens['n_cases']} images, {ens['n_patients']} patients, {ens['n_positive']} positive) "
        f"| value | {level}% CI (patient bootstrap) |",
        "| --- | --- | --- |",
    ]
    for name, label in ROWS:
        m = ens[name]
        lines.append(f"| {label} | {m['value']:.3f} | {m['ci_low']:.3f}-{m['ci_high']:.3f} |")
    lines.append(
        f"| operating threshold (Youden, out-of-fold validation) | {ens['threshold']:.3f} | |"
    )
    fold_aurocs = [f["test_auroc"] for f in metrics["folds"]]
    lines.append(
        f"| single fold models, test AUROC | {min(fold_aurocs):.3f}-{max(fold_aurocs):.3f} | |"
    )
    return "\n".join(lines)


def update_readme(readme: str | Path, metrics: dict) -> None:
    path = Path(readme)
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {START} ... {END} block to update")
    path.write_text(pattern.sub(lambda _: f"{START}\n{readme_block(metrics)}\n{END}", text))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print (or write into the README) a study's result."
    )
    parser.add_argument("metrics", nargs="?", default="results/evaluate/metrics.json")
    parser.add_argument("--update-readme", metavar="README")
    args = parser.parse_args()
    metrics = json.loads(Path(args.metrics).read_text())
    print(headline(metrics))
    if args.update_readme:
        update_readme(args.update_readme, metrics)
        print(f"updated the result block of {args.update_readme}")


if __name__ == "__main__":
    main()
