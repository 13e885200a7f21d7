"""Snakemake entry: Grad-CAM overlays for the test set's most confident TPs and FPs."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.gradcam import run_cam_figures
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    counts = run_cam_figures(
        snakemake.input.models,
        snakemake.input.preprocessed,
        snakemake.input.per_case,
        snakemake.input.annotations,
        task_name=snakemake.params.task,
        layer=snakemake.params.layer,
        n_cases=snakemake.params.n_cases,
        out_true_positive=snakemake.output.true_positives,
        out_false_positive=snakemake.output.false_positives,
        threads=snakemake.threads,
    )
    print(f"Grad-CAM cases: {counts}")
