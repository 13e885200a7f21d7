"""Snakemake entry: the patient-level split: radflow's stratified test set and k folds,
or the official split table's (pseudonymised by the index)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow


from radflow.runlog import log_to
from radflow.split import (
    apply_official_split,
    apply_official_test_split,
    split_patients,
    write_split,
)
from radflow.tables import read_tsv

with log_to(snakemake.log[0]):
    series = read_tsv(snakemake.input.series)
    official = read_tsv(snakemake.input.official, text=True)
    settings = snakemake.params.split
    if settings.get("table") and settings["table_folds"] == "cross_validation":
        print(f"split: the official split table's test patients; the others dealt into "
              f"{settings['n_folds']} stratified folds (seed {snakemake.params.seed})")  # fmt: skip
        assignment = apply_official_test_split(
            series, official, n_folds=settings["n_folds"], seed=snakemake.params.seed
        )
    elif settings.get("table"):
        print(f"split: the official split table ({len(official)} patients) as given; "
              "split.test_fraction is not used")  # fmt: skip
        assignment = apply_official_split(series, official)
    else:
        print(f"split: radflow's patient-level stratified split (seed {snakemake.params.seed})")
        assignment = split_patients(
            series,
            seed=snakemake.params.seed,
            n_folds=settings["n_folds"],
            test_fraction=settings["test_fraction"],
        )
    write_split(assignment, snakemake.output[0])
