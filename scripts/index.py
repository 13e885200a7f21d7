"""Snakemake entry: index the DICOM tree, join labels, pseudonymise, assign shards."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow import conventions as C
from radflow.dicom.index import build_index
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    key, _ = C.load_or_create_key(snakemake.input.key)
    result = build_index(
        snakemake.params.dicom_root,
        snakemake.input.labels,
        annotations_table=snakemake.input.annotations or None,
        key=key,
        n_shards=snakemake.params.n_shards,
        threads=snakemake.threads,
        **snakemake.params.labels,
    )
    result.write(
        Path(snakemake.output.series).parent, Path(snakemake.output.quarantine_paths).parent
    )
    print(result.summary_text())
