rule figures:
    input:
        curves=f"{RESULTS}/evaluate/curves.json",
        histories=expand(f"{RESULTS}/train/fold{{fold}}/history.tsv", fold=FOLDS),
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        roc=report(
            f"{RESULTS}/figures/roc.png",
            caption="../report/roc.rst",
            category="Performance",
            labels={"figure": "ROC"},
        ),
        pr=report(
            f"{RESULTS}/figures/precision_recall.png",
            caption="../report/precision_recall.rst",
            category="Performance",
            labels={"figure": "precision-recall"},
        ),
        calibration=report(
            f"{RESULTS}/figures/calibration.png",
            caption="../report/calibration.rst",
            category="Performance",
            labels={"figure": "calibration"},
        ),
        confusion=report(
            f"{RESULTS}/figures/confusion.png",
            caption="../report/confusion.rst",
            category="Performance",
            labels={"figure": "confusion matrix"},
        ),
        training=report(
            f"{RESULTS}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        f"{LOGS}/figures.log",
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **get_resources("figures"),
    script:
        "../scripts/figures.py"


rule gradcam:
    input:
        models=expand(f"{RESULTS}/train/fold{{fold}}/model.pt", fold=FOLDS),
        preprocessed=get_preprocessed(),
        per_case=f"{RESULTS}/evaluate/per_case.tsv",
        annotations=f"{RESULTS}/index/{C.ANNOTATIONS_TABLE}",
    output:
        true_positives=report(
            f"{RESULTS}/figures/gradcam_true_positives.png",
            caption="../report/gradcam.rst",
            category="Explanations",
            labels={"figure": "Grad-CAM, true positives"},
        ),
        false_positives=report(
            f"{RESULTS}/figures/gradcam_false_positives.png",
            caption="../report/gradcam.rst",
            category="Explanations",
            labels={"figure": "Grad-CAM, false positives"},
        ),
    log:
        f"{LOGS}/gradcam.log",
    conda:
        "../envs/figures.yaml"
    threads: get_threads("figures")
    resources:
        **get_resources("gradcam"),
    params:
        task=config["task"],
        layer=config["figures"]["cam_layer"],
        n_cases=config["figures"]["cam_cases"],
    script:
        "../scripts/gradcam.py"
