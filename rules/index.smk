checkpoint index:
    input:
        dicom=get_dicom_input(),
        labels=config["data"]["labels_table"],
        annotations=get_annotations_input(),
        key=KEY_FILE,
    output:
        series=f"{RESULTS}/index/{C.SERIES_TABLE}",
        quarantine=report(
            f"{RESULTS}/index/{C.QUARANTINE_TABLE}",
            caption="../report/quarantine.rst",
            category="Data",
            labels={"table": "files and images left out"},
        ),
        annotations=f"{RESULTS}/index/{C.ANNOTATIONS_TABLE}",
        summary=f"{RESULTS}/index/{C.INDEX_SUMMARY}",
        quarantine_paths=f"{PRIVATE}/{C.QUARANTINE_PATHS}",
        shard_files=expand(f"{PRIVATE}/{C.SHARD_INDEX_DIR}/{{shard}}.tsv", shard=SHARDS),
    log:
        f"{LOGS}/index.log",
    conda:
        "../envs/dicom.yaml"
    threads: get_threads("index")
    resources:
        **get_resources("index"),
    params:
        dicom_root=get_dicom_root,
        labels=get_label_params(),
        n_shards=N_SHARDS,
        tree_fingerprint=get_tree_fingerprint(),
    script:
        "../scripts/index.py"


# see INDEX_IS_CHECKPOINT in rules/common.smk
workflow.get_rule("index").is_checkpoint = INDEX_IS_CHECKPOINT
