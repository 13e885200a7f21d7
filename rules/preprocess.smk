rule preprocess:
    input:
        nifti=f"{RESULTS}/nifti/{{shard}}",
        shard_files=get_shard_files,  # re-planned after the index (rules/common.smk)
    output:
        directory(f"{RESULTS}/preprocessed/{{shard}}"),
    log:
        f"{LOGS}/preprocess/{{shard}}.log",
    conda:
        "../envs/preprocess.yaml"
    threads: get_threads("preprocess")
    resources:
        **get_resources("preprocess"),
    params:
        preprocess=get_preprocess_params(),
    script:
        "../scripts/preprocess.py"
