rule predict:
    input:
        model=f"{RESULTS}/train/fold{{fold}}/model.pt",
        preprocessed=get_preprocessed(),
        folds=f"{RESULTS}/split/folds.tsv",
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        f"{RESULTS}/predict/fold{{fold}}.tsv",
    log:
        f"{LOGS}/predict/fold{{fold}}.log",
    conda:
        "../envs/task.yaml"
    threads: get_threads("predict")
    resources:
        **get_resources("predict"),
        gpu=1,
    params:
        task=config["task"],
        device=config["train"]["device"],
        batch_size=config["train"]["eval_batch_size"],
        calibration=config["evaluate"]["calibration"],
    script:
        "../scripts/predict.py"
