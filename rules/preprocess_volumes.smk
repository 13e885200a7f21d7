# The volumes layout (segmentation, localisation: Task.preprocessed_layout "volumes"),
# included instead of rules/preprocess.smk. nnU-Net's order: a plan from the training
# cases (after convert and split; the split reads only the index), then every shard at
# the plan's spacing. radflow/plan.py, radflow/volumes.py.


# plan.json and fingerprint.json lie beside the shard folders
wildcard_constraints:
    shard=r"shard-\d+",


# A checkpoint, like the index: a plan rewritten with the same bytes (a case added, the
# same spacing) leaves plan.json untouched, and the shards re-planned after it are not
# redone unless their own conversion changed.
checkpoint preprocess_plan:
    input:
        nifti=expand(f"{RESULTS}/nifti/{{shard}}", shard=SHARDS),
        folds=f"{RESULTS}/split/folds.tsv",
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        plan=PREPROCESS_PLAN,
        fingerprint=f"{RESULTS}/preprocessed/{C.PREPROCESS_FINGERPRINT}",
    log:
        f"{LOGS}/preprocess/plan.log",
    conda:
        "../envs/volumes.yaml"
    threads: 1
    resources:
        **get_resources("preprocess_plan"),
    params:
        target_spacing_mm=config["preprocess"]["target_spacing_mm"],
    script:
        "../scripts/preprocess_plan.py"


rule preprocess_volumes:
    input:
        nifti=f"{RESULTS}/nifti/{{shard}}",
        shard_files=get_shard_files,  # re-planned after the index (rules/common.smk)
        plan=get_preprocess_plan,  # re-planned after the plan (rules/common.smk)
        # lesion centres (world mm), carried into each case's preprocessed voxels
        lesions=f"{RESULTS}/index/{LESIONS_TABLE}",
        excluded_lesions=f"{RESULTS}/index/{EXCLUDED_LESIONS_TABLE}",
    output:
        directory(f"{RESULTS}/preprocessed/{{shard}}"),
    log:
        f"{LOGS}/preprocess/{{shard}}.log",
    conda:
        "../envs/volumes.yaml"
    threads: get_threads("preprocess")
    resources:
        **get_resources("preprocess"),
    params:
        preprocess=get_preprocess_params(),
    script:
        "../scripts/preprocess_volumes.py"


# see INDEX_IS_CHECKPOINT in rules/common.smk
workflow.get_rule("preprocess_plan").is_checkpoint = INDEX_IS_CHECKPOINT
