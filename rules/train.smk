rule train:
    input:
        preprocessed=get_preprocessed(),
        folds=f"{RESULTS}/split/folds.tsv",
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        model=f"{RESULTS}/train/fold{{fold}}/model.pt",
        history=f"{RESULTS}/train/fold{{fold}}/history.tsv",
    log:
        f"{LOGS}/train/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/fold{{fold}}.tsv"
    conda:
        "../envs/task.yaml"
    threads: get_threads("train")
    resources:
        **get_resources("train"),
        gpu=1,
    params:
        **task_params("train"),
        task=config["task"],
        model=config["model"],
        train=config["train"],
        seed=config["seed"],
    script:
        "../scripts/train.py"
