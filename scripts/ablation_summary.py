"""Snakemake entry: the ablation's summary table and figures, from every job's files."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.ablation import write_summary
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    write_summary(
        [Path(p).parent for p in snakemake.input.history],
        snakemake.input.preprocessed,
        task_name=snakemake.params.task,
        task_modules=snakemake.config["task_modules"],
        model=snakemake.params.model,
        evaluate=snakemake.params.evaluate,
        out={
            name: Path(snakemake.output[name])
            for name in ("summary", "training_loss", "gradient_norms", "test_metric")
        },
    )
