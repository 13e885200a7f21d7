"""Snakemake entry: normalise and resample one shard into a memory-mappable array."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.preprocess import PreprocessSettings, preprocess_shard
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    manifest = preprocess_shard(
        snakemake.input[0],
        snakemake.output[0],
        PreprocessSettings.from_config(snakemake.params.preprocess),
        threads=snakemake.threads,
    )
    print(f"preprocessed {len(manifest)} images")
