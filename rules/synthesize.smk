# Demo only: the synthetic cohort enters the index exactly as a user's export would.
if SYNTHETIC and config["synthesize"]["cohort"] == "chest_radiographs":

    rule synthesize:
        output:
            dicom=directory(config["data"]["dicom_root"]),
            labels=config["data"]["labels_table"],
            lesions=config["data"]["annotations_table"],
        log:
            f"{LOGS}/synthesize.log",
        conda:
            "../envs/dicom.yaml"
        threads: get_threads("synthesize")
        resources:
            **get_resources("synthesize"),
        params:
            cohort=config["synthesize"],
        script:
            "../scripts/synthesize.py"


# The segmentation demo: MR studies, masks as NIfTI or DICOM SEG, a masks table
# (radflow/synth/brain.py), all in the folder above data.dicom_root.
if SYNTHETIC and config["synthesize"]["cohort"] == "brain_mri":

    rule synthesize:
        output:
            dicom=directory(config["data"]["dicom_root"]),
            masks=directory(f"{BRAIN_COHORT}/labels"),
            table=f"{BRAIN_COHORT}/labels.csv",
            lesions=f"{BRAIN_COHORT}/lesions.csv",
        log:
            f"{LOGS}/synthesize.log",
        conda:
            "../envs/dicom.yaml"
        threads: get_threads("synthesize")
        resources:
            **get_resources("synthesize"),
        params:
            cohort=config["synthesize"],
        script:
            "../scripts/synthesize.py"


# The nodule-localisation demo: chest CT series, LUNA16-form annotations and a labels
# table (radflow/synth/chest.py), all in the folder above data.dicom_root.
if SYNTHETIC and config["synthesize"]["cohort"] == "lung_ct":

    rule synthesize:
        output:
            dicom=directory(config["data"]["dicom_root"]),
            annotations=f"{LUNG_COHORT}/annotations.csv",
            excluded=f"{LUNG_COHORT}/annotations_excluded.csv",
            seriesuids=f"{LUNG_COHORT}/seriesuids.csv",
        log:
            f"{LOGS}/synthesize.log",
        conda:
            "../envs/dicom.yaml"
        threads: get_threads("synthesize")
        resources:
            **get_resources("synthesize"),
        params:
            cohort=config["synthesize"],
        script:
            "../scripts/synthesize.py"
