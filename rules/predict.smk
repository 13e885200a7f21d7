# fold numbers are digits: results/predict/fold<k>.tsv and its folder fold<k>/
wildcard_constraints:
    fold=r"\d+",


rule predict:
    input:
        model=f"{RESULTS}/train/fold{{fold}}/model.pt",
        preprocessed=get_preprocessed(),
        folds=f"{RESULTS}/split/folds.tsv",
        series=get_series_table,  # re-planned after the index (rules/common.smk)
        # the converted images (volumes layout: predictions go back onto their grid)
        nifti=get_nifti_for_prediction(),
    output:
        f"{RESULTS}/predict/fold{{fold}}.tsv",
        # a task's own prediction files (segmentation: masks), where it writes any
        **({"files": directory(PREDICTION_FILES)} if TASK.prediction_files else {}),
    log:
        f"{LOGS}/predict/fold{{fold}}.log",
    conda:
        "../envs/task.yaml"
    threads: get_threads("predict")
    resources:
        **get_resources("predict"),
        gpu=1,
    params:
        **TASK_PARAMS,
        task=config["task"],
        device=config["train"]["device"],
        batch_size=config["train"]["eval_batch_size"],
        calibration=config["evaluate"]["calibration"],
    script:
        "../scripts/predict.py"
