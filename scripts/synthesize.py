"""Snakemake entry: write the synthetic demo cohort."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to
from radflow.synth.cohort import CohortSpec, synthesize_cohort

with log_to(snakemake.log[0]):
    cohort = {k: v for k, v in snakemake.params.cohort.items() if k != "enabled"}
    counts = synthesize_cohort(
        snakemake.output.dicom,
        snakemake.output.labels,
        snakemake.output.lesions,
        CohortSpec(**cohort),
        threads=snakemake.threads,
    )
    print(f"synthesized {counts}")
