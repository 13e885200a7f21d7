# The residual connection, measured (radflow/ablation.py): `snakemake ablation`.
# Not part of `all`: its outputs live under results/ablation/ and it reads only the
# study's preprocessed shards and split, so the study's own outputs are never touched.
# Paths, job lists and the input function: rules/common.smk (ABLATION...).


wildcard_constraints:
    variant="plain|residual",
    depth=r"\d+",


rule ablation_train:
    input:
        preprocessed=get_preprocessed(),
        folds=f"{RESULTS}/split/folds.tsv",
        series=get_series_table,  # re-planned after the index (rules/common.smk)
    output:
        **{
            name: f"{ABLATION}/{{variant}}{{depth}}/fold{{fold}}/{file}"
            for name, file in JOB_FILES.items()
        },
    log:
        f"{LOGS}/ablation/{{variant}}{{depth}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/{{variant}}{{depth}}/fold{{fold}}.tsv"
    conda:
        "../envs/task.yaml"
    threads: get_threads("train")
    resources:
        **get_resources("train"),
        gpu=1,
    params:
        task=config["task"],
        model=ABLATION_MODEL,
        train=config["train"],
        seed=config["seed"],
        early_steps=ABLATION_CONFIG["early_steps"],
    script:
        "../scripts/ablation_train.py"


rule ablation_summary:
    input:
        **{name: ablation_job_files(name) for name in JOB_FILES},
        preprocessed=get_preprocessed(),
    output:
        **{
            name: report(
                f"{ABLATION}/{name}.png",
                caption=f"../report/{caption}",
                category="Residual ablation",
                labels={"figure": label},
            )
            for name, (caption, label) in ABLATION_FIGURES.items()
        },
        summary=report(
            f"{ABLATION}/summary.tsv",
            caption="../report/ablation_summary.rst",
            category="Residual ablation",
            labels={"table": "summary by variant, depth and fold"},
        ),
    log:
        f"{LOGS}/ablation/summary.log",
    conda:
        "../envs/task.yaml"
    threads: 1
    resources:
        **get_resources("figures"),
    params:
        task=config["task"],
        model=ABLATION_MODEL,
        evaluate=config["evaluate"],
        monitor_label=TASK.monitor_label,  # named by the captions
    script:
        "../scripts/ablation_summary.py"


rule ablation_efficiency:
    input:
        preprocessed=get_preprocessed(),
    output:
        report(
            f"{ABLATION}/efficiency.tsv",
            caption="../report/ablation_efficiency.rst",
            category="Residual ablation",
            labels={"table": "what each model costs"},
        ),
    log:
        f"{LOGS}/ablation/efficiency.log",
    conda:
        "../envs/task.yaml"
    threads: get_threads("train")
    resources:
        **get_resources("figures"),
        gpu=1,
    params:
        task=config["task"],
        model=ABLATION_MODEL,
        variants=ABLATION_CONFIG["variants"],
        depths=ABLATION_CONFIG["depths"],
        batch_size=config["train"]["batch_size"],
        device=config["train"]["device"],
    script:
        "../scripts/ablation_efficiency.py"


rule ablation:
    input:
        rules.ablation_summary.output,
        rules.ablation_efficiency.output,
