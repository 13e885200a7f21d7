"""Snakemake entry: the task's evaluation of all folds' predictions."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to
from radflow.tasks import get_task

with log_to(snakemake.log[0]):
    task = get_task(
        snakemake.params.task,
        modules=snakemake.config["task_modules"],
        options=snakemake.params.get("task_options"),
    )
    headline = task.evaluate(
        task.read_predictions(snakemake.input.predictions),
        snakemake.params.evaluate,
        Path(snakemake.output[0]).parent,  # results/evaluate/, where all its files go
    )
    print(headline)
