"""Snakemake entry: convert one shard of image units to NIfTI with PHI-free sidecars
(DICOM units through dcm2niix or radflow's reader; images-table cases through
radflow.images)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    if snakemake.params.images_table:
        from radflow.images import convert_table_shard

        manifest = convert_table_shard(
            snakemake.input.files,
            snakemake.params.source_root,
            snakemake.output[0],
            threads=snakemake.threads,
            compression_level=snakemake.params.compression_level,
        )
    else:
        from radflow.dicom.convert import convert_shard

        manifest = convert_shard(
            snakemake.input.files,
            snakemake.params.source_root,
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
