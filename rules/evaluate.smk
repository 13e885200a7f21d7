rule evaluate:
    input:
        predictions=expand(f"{RESULTS}/predict/fold{{fold}}.tsv", fold=FOLDS),
        series=get_series_table,  # re-planned after the index (rules/common.smk)
        prediction_files=get_prediction_files(),
    output:
        **task_files(EVALUATE, TASK.evaluation_files()),
    log:
        f"{LOGS}/evaluate.log",
    conda:
        "../envs/task.yaml"
    threads: 1
    resources:
        **get_resources("evaluate"),
    params:
        **task_params("evaluate"),
        task=config["task"],
        evaluate=config["evaluate"],
    script:
        "../scripts/evaluate.py"
