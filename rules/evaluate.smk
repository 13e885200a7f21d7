rule evaluate:
    input:
        predictions=expand(f"{RESULTS}/predict/fold{{fold}}.tsv", fold=FOLDS),
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        metrics=f"{RESULTS}/evaluate/metrics.json",
        table=report(
            f"{RESULTS}/evaluate/metrics.tsv",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"table": "ensemble on the test set"},
        ),
        per_case=f"{RESULTS}/evaluate/per_case.tsv",
        curves=f"{RESULTS}/evaluate/curves.json",
    log:
        f"{LOGS}/evaluate.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        **get_resources("evaluate"),
    params:
        evaluate=config["evaluate"],
    script:
        "../scripts/evaluate.py"
