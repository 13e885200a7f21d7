"""Snakemake entry: the volumes layout's plan (target spacing from the training cases)
and the fingerprint it was decided from."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.plan import plan_preprocessing, write_json
from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    plan, fingerprint = plan_preprocessing(
        snakemake.input.nifti,
        snakemake.input.folds,
        configured_spacing=snakemake.params.target_spacing_mm,
    )
    write_json(fingerprint, snakemake.output.fingerprint)
    write_json(plan, snakemake.output.plan)
    print(f"plan from {fingerprint['training_cases']} training cases: target spacing "
          f"{plan['target_spacing_mm']} mm (z, y, x; {plan['target_spacing_from']}), "
          f"{plan['n_channels']} channel(s)")  # fmt: skip
