"""Snakemake entry: one ablation job (variant, depth, fold); see radflow/ablation.py."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.ablation import JOB_FILES, run_ablation_fold
from radflow.runlog import log_to
from radflow.train import TrainSettings

with log_to(snakemake.log[0]):
    run_ablation_fold(
        snakemake.input.preprocessed,
        snakemake.input.folds,
        int(snakemake.wildcards.fold),
        variant=snakemake.wildcards.variant,
        depth=int(snakemake.wildcards.depth),
        task_name=snakemake.params.task,
        task_modules=snakemake.config["task_modules"],
        settings=TrainSettings.from_config(
            snakemake.params.train, snakemake.params.model, snakemake.params.seed
        ),
        early_steps=snakemake.params.early_steps,
        threads=snakemake.threads,
        out={name: snakemake.output[name] for name in JOB_FILES},
    )
