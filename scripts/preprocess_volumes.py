"""Snakemake entry: one shard in the volumes layout (each case reoriented, cropped to its
foreground, normalised and resampled to the plan's spacing; radflow/volumes.py)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.lesions import read_index_lesions
from radflow.plan import read_plan
from radflow.runlog import log_to
from radflow.volumes import VolumeSettings, preprocess_volumes_shard

with log_to(snakemake.log[0]):
    manifest = preprocess_volumes_shard(
        snakemake.input.nifti,
        snakemake.output[0],
        read_plan(snakemake.input.plan),
        VolumeSettings.from_config(snakemake.params.preprocess),
        threads=snakemake.threads,
        lesions=read_index_lesions(snakemake.input.lesions, snakemake.input.excluded_lesions),
    )
    print(f"preprocessed {len(manifest)} cases, {int(manifest['has_mask'].sum())} with a mask")
