rule figures:
    input:
        evaluation=get_evaluation_files(),
        histories=expand(f"{RESULTS}/train/fold{{fold}}/history.tsv", fold=FOLDS),
        series=get_series_table,  # re-planned after the index (rules/common.smk)
        prediction_files=get_prediction_files(),
    output:
        **task_files(FIGURES, TASK.figure_files()),
        training_curves=report(
            TRAINING_CURVES,
            caption="../report/training_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        f"{LOGS}/figures.log",
    conda:
        "../envs/task.yaml"
    threads: 1
    resources:
        **get_resources("figures"),
    params:
        **task_params("figures"),
        task=config["task"],
        monitor_label=TASK.monitor_label,  # named by the training curves' caption
    script:
        "../scripts/figures.py"


# Figures of single cases drawn through the fold models (classification: Grad-CAM),
# where the task has any.
if TASK.case_figure_files():

    rule case_figures:
        input:
            models=expand(f"{RESULTS}/train/fold{{fold}}/model.pt", fold=FOLDS),
            preprocessed=get_preprocessed(),
            evaluation=get_evaluation_files(),
            annotations=f"{RESULTS}/index/{C.ANNOTATIONS_TABLE}",
        output:
            **task_files(FIGURES, TASK.case_figure_files()),
        log:
            f"{LOGS}/case_figures.log",
        conda:
            "../envs/task.yaml"
        threads: get_threads("figures")
        resources:
            **get_resources("case_figures"),
        params:
            task=config["task"],
            figures=config["figures"],
        script:
            "../scripts/case_figures.py"
