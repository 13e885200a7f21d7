rule preprocess:
    input:
        f"{RESULTS}/nifti/{{shard}}",
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
        preprocess=config["preprocess"],
    script:
        "../scripts/preprocess.py"
