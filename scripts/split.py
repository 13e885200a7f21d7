"""Snakemake entry: patient-level stratified test set and k folds."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

import pandas as pd

from radflow.runlog import log_to
from radflow.split import split_patients, write_split

with log_to(snakemake.log[0]):
    series = pd.read_csv(snakemake.input[0], sep="\t", dtype=str, keep_default_na=False)
    series["label"] = series["label"].astype(int)
    assignment = split_patients(series, seed=snakemake.params.seed, **snakemake.params.split)
    write_split(assignment, snakemake.output[0])
