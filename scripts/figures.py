"""Snakemake entry: performance and training figures, drawn from stored numbers."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

import json

import pandas as pd

from radflow import figures
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    curves = json.loads(open(snakemake.input.curves).read())
    figures.plot_roc(curves, snakemake.output.roc)
    figures.plot_precision_recall(curves, snakemake.output.pr)
    figures.plot_calibration(curves, snakemake.output.calibration)
    figures.plot_confusion(curves, snakemake.output.confusion)
    histories = {}
    for path in snakemake.input.histories:
        history = pd.read_csv(path, sep="\t")
        histories[int(history["fold"].iloc[0])] = history
    figures.plot_training_curves(histories, snakemake.output.training)
