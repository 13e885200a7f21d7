rule preprocess:
    input:
        nifti=f"{RESULTS}/nifti/{{shard}}",
        # unused by the script: makes the job re-planned once `index` has rerun (see
        # get_shard_files), so an unchanged shard is not preprocessed again
        files=get_shard_files,
    output:
        directory(f"{RESULTS}/preprocessed/{{shard}}"),
    log:
        f"{LOGS}/preprocess/{{shard}}.log",
    conda:
        "../envs/preprocess.yaml"
    threads: get_threads("preprocess")
    params:
        preprocess=config["preprocess"],
    script:
        "../scripts/preprocess.py"
