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
        shard_files=get_private_shard_tables,  # DICOM SEG: the source series' files
    output:
        f"{RESULTS}/predict/fold{{fold}}.tsv",
        # a task's own prediction files (segmentation: masks), where it writes any
        **({"files": directory(PREDICTION_FILES)} if TASK.prediction_files else {}),
        # ... and, for DICOM input, those that reference the source series (DICOM SEG)
        **({"private": directory(PRIVATE_PREDICTIONS)} if DICOM_PREDICTIONS else {}),
    log:
        f"{LOGS}/predict/fold{{fold}}.log",
    conda:
        "../envs/task.yaml"
    threads: get_threads("predict")
    resources:
        **get_resources("predict"),
        gpu=1,
    params:
        **task_params("predict"),
        **({"dicom_root": config["data"]["dicom_root"]} if DICOM_PREDICTIONS else {}),
        task=config["task"],
        device=config["train"]["device"],
        batch_size=config["train"]["eval_batch_size"],
        calibration=config["evaluate"]["calibration"],
    script:
        "../scripts/predict.py"
