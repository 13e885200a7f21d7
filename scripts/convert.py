"""Snakemake entry: convert one shard of image units to NIfTI with PHI-free sidecars."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.dicom.convert import convert_shard
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    manifest = convert_shard(
        snakemake.input.files,
        snakemake.params.dicom_root,
        snakemake.output[0],
        threads=snakemake.threads,
        compression_level=snakemake.params.compression_level,
        uneven_spacing=snakemake.params.uneven_spacing,
        gantry_tilt=snakemake.params.gantry_tilt,
    )
    failed = manifest[manifest["status"] != "ok"]
    print(f"converted {len(manifest) - len(failed)} units, {len(failed)} failed")
    for _, row in failed.iterrows():
        print(f"  {row['series_pid']}: {row['reason']}")
