"""Snakemake entry: metrics with bootstrap CIs from all folds' predictions."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

import pandas as pd

from radflow.evaluate import evaluate_classification, write_evaluation
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    predictions = pd.concat(
        [
            pd.read_csv(p, sep="\t", dtype={"series_pid": str, "patient_pid": str})
            for p in snakemake.input.predictions
        ],
        ignore_index=True,
    )
    settings = snakemake.params.evaluate
    result = evaluate_classification(
        predictions,
        n_boot=settings["n_boot"],
        alpha=settings["alpha"],
        n_calibration_bins=settings["calibration_bins"],
    )
    write_evaluation(result, Path(snakemake.output.metrics).parent)
    auroc = result.metrics["ensemble_test"]["auroc"]
    print(
        f"ensemble test AUROC {auroc['value']:.3f} "
        f"(95% CI {auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})"
    )
