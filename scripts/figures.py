"""Snakemake entry: the training curves and the task's figures, drawn from stored numbers."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow


from radflow.figures import plot_training_curves
from radflow.runlog import log_to
from radflow.tables import read_tsv
from radflow.tasks import get_task

with log_to(snakemake.log[0]):
    task = get_task(
        snakemake.params.task,
        modules=snakemake.config["task_modules"],
        options=snakemake.params.get("task_options"),
    )
    task.draw_figures(
        Path(snakemake.input.evaluation[0]).parent,  # results/evaluate/
        {name: Path(snakemake.output[name]) for name in task.figure_files()},
    )
    histories = {}
    for path in snakemake.input.histories:
        history = read_tsv(path)
        histories[int(history["fold"].iloc[0])] = history
    plot_training_curves(
        histories,
        snakemake.output.training_curves,
        monitor=task.monitor,
        monitor_label=task.monitor_label,
        monitor_axis=task.monitor_axis,
    )
