"""Snakemake entry: write the synthetic demo cohort (config synthesize.cohort)."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

from radflow.runlog import log_to

with log_to(snakemake.log[0]):
    settings = dict(snakemake.params.cohort)
    if settings["cohort"] == "brain_mri":
        from radflow.synth.brain import synthesize_brain_cohort

        brain = settings["brain"]
        paths = synthesize_brain_cohort(
            Path(snakemake.output.dicom).parent,
            settings["n_patients"],
            settings["seed"],
            workers=snakemake.threads,
            progress=True,
            scale=brain["scale"],
            lesion_diameter_mm=tuple(brain["lesion_diameter_mm"]),
            seg_fraction=brain["seg_fraction"],
            n_junk_files=brain["n_junk_files"],
        )
        print(f"synthesized {settings['n_patients']} brain MR studies")
    elif settings["cohort"] == "lung_ct":
        from radflow.synth.chest import synthesize_chest_cohort

        synthesize_chest_cohort(  # synthesize.lung's keys are the function's options
            Path(snakemake.output.dicom).parent,
            settings["n_patients"],
            settings["seed"],
            workers=snakemake.threads,
            **settings["lung"],
        )
        print(f"synthesized {settings['n_patients']} chest CT series")
    else:
        from radflow.synth.cohort import CohortSpec, synthesize_cohort

        skip = ("enabled", "cohort", "brain", "lung")
        cohort = {k: v for k, v in settings.items() if k not in skip}
        counts = synthesize_cohort(
            snakemake.output.dicom,
            snakemake.output.labels,
            snakemake.output.lesions,
            CohortSpec(**cohort),
            threads=snakemake.threads,
        )
        print(f"synthesized {counts}")
