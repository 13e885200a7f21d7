rule split:
    input:
        series=get_series_table,
        official=f"{RESULTS}/index/{OFFICIAL_SPLIT_TABLE}",
    output:
        f"{RESULTS}/split/folds.tsv",
    log:
        f"{LOGS}/split.log",
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    resources:
        **get_resources("split"),
    params:
        split=config["split"],
        seed=config["seed"],
    script:
        "../scripts/split.py"
