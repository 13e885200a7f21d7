"""Snakemake entry: the task's figures of single cases, drawn through the fold models
(classification: Grad-CAM of the test set's most confident true and false positives)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to
from radflow.tasks import get_task

with log_to(snakemake.log[0]):
    task = get_task(snakemake.params.task, modules=snakemake.config["task_modules"])
    summary = task.draw_case_figures(
        models=[Path(p) for p in snakemake.input.models],
        preprocessed=[Path(p) for p in snakemake.input.preprocessed],
        evaluation_dir=Path(snakemake.input.evaluation[0]).parent,  # results/evaluate/
        annotations=Path(snakemake.input.annotations),
        settings=snakemake.params.figures,
        out={name: Path(snakemake.output[name]) for name in task.case_figure_files()},
        threads=snakemake.threads,
    )
    print(summary)
