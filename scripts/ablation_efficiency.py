"""Snakemake entry: what each of the ablation's models costs (radflow/efficiency.py)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.efficiency import write_efficiency
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    write_efficiency(
        snakemake.input.preprocessed,
        snakemake.output[0],
        task_name=snakemake.params.task,
        task_modules=snakemake.config["task_modules"],
        model=snakemake.params.model,
        variants=snakemake.params.variants,
        depths=snakemake.params.depths,
        batch_size=snakemake.params.batch_size,
        device=snakemake.params.device,
        threads=snakemake.threads,
    )
