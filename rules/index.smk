checkpoint index:
    input:
        source=get_source_input(),
        labels=get_labels_input(),
        annotations=get_annotations_input(),
        key=KEY_FILE,
        split_table=get_split_table_input(),
        lesions=get_lesions_input(),
        excluded_lesions=get_excluded_lesions_input(),
        masks=get_masks_input(),
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
        official_split=f"{RESULTS}/index/{OFFICIAL_SPLIT_TABLE}",
        lesions=f"{RESULTS}/index/{LESIONS_TABLE}",
        excluded_lesions=f"{RESULTS}/index/{EXCLUDED_LESIONS_TABLE}",
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
        data=get_data_params(),
        n_shards=N_SHARDS,
        tree_fingerprint=get_tree_fingerprint(),
    script:
        "../scripts/index.py"


# see INDEX_IS_CHECKPOINT in rules/common.smk
workflow.get_rule("index").is_checkpoint = INDEX_IS_CHECKPOINT
