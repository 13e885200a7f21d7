"""Snakemake entry: train the model of one fold."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to
from radflow.train import TrainSettings, run_fold

with log_to(snakemake.log[0]):
    run_fold(
        snakemake.input.preprocessed,
        snakemake.input.folds,
        int(snakemake.wildcards.fold),
        task_name=snakemake.params.task,
        task_modules=snakemake.config["task_modules"],
        task_options=snakemake.params.get("task_options"),
        settings=TrainSettings.from_config(
            snakemake.params.train, snakemake.params.model, snakemake.params.seed
        ),
        threads=snakemake.threads,
        model_path=snakemake.output.model,
        history_path=snakemake.output.history,
    )
