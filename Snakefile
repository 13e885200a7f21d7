# radflow: an end-to-end medical-imaging deep-learning study.
#   snakemake --cores 8 --resources gpu=1
#   snakemake --report results/report.html
#   snakemake ablation --cores 8 --resources gpu=1   (plain vs residual networks by depth)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml", set_default=True)


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/synthesize.smk"
include: "rules/index.smk"
include: "rules/convert.smk"
include: PREPROCESS_RULES  # the task's layout: grid or volumes (rules/common.smk)
include: "rules/split.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/evaluate.smk"
include: "rules/figures.smk"
include: "rules/ablation.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
