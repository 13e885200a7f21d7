# Demo only: the synthetic cohort enters the index exactly as a user's export would.
if SYNTHETIC:

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
