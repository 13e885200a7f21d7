"""Snakemake entry: one fold model's predictions on its validation fold and the test set."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.predict import predict_fold
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    predict_fold(
        snakemake.input.model,
        snakemake.input.preprocessed,
        snakemake.input.folds,
        int(snakemake.wildcards.fold),
        task_name=snakemake.params.task,
        task_modules=snakemake.config["task_modules"],
        task_options=snakemake.params.get("task_options"),
        device=snakemake.params.device,
        batch_size=snakemake.params.batch_size,
        threads=snakemake.threads,
        calibration=snakemake.params.calibration,
        out_path=snakemake.output[0],
        out_dir=snakemake.output.get("files"),
        shard_tables=snakemake.input.get("shard_files", []),
        dicom_root=snakemake.params.get("dicom_root"),
        private_dir=snakemake.output.get("private"),
    )
