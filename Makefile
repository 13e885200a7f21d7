# radflow: two commands do all set-up on a fresh machine.
#   make demo   create .venv, install, run the study on the embedded synthetic cohort
#   make test   create .venv, install, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# PyTorch: where no NVIDIA GPU is found, take the CPU build (on this project's CI image
# the 2.13.0 CPU wheel lies on disk; elsewhere set TORCH_INDEX to PyTorch's CPU index,
# e.g. https://download.pytorch.org/whl/cpu, to avoid a multi-GB CUDA download).
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.4
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: demo demo-segmentation demo-localization lidc-localization brats ablation test test-fast lint report readme-result clean help

help:
	@echo "make demo  - install into $(VENV) and run the study on the synthetic cohort"
	@echo "make test  - install into $(VENV) and run the tests"
	@echo "make demo-segmentation - the 3D segmentation demo (synthetic brain MR) in studies/segmentation/"
	@echo "make demo-localization - the 3D localisation demo (synthetic chest CT, LUNA16 FROC) in studies/localization/"
	@echo "make lidc-localization - the localisation demo's models on the real LIDC slabs, scored against LUNA16"
	@echo "make brats - segmentation of the real BraTS cases in ../shared/data (studies/brats/)"
	@echo "make ablation - the demo's plain vs residual networks by depth (README), its report"
	@echo "make test-fast - the inner loop: every test but the full-DAG runs and SLURM"
	@echo "make lint  - ruff, snakefmt and snakemake --lint"
	@echo "make clean - remove results/ and Snakemake's state (keeps data/ and private/)"

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
ifeq ($(HAS_GPU),yes)
	$(BIN)/pip install --quiet "$(TORCH_GPU)"
else
	$(BIN)/pip install --quiet "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/snakemake --cores $(CORES) --resources gpu=1
	$(BIN)/snakemake --cores 1 --report results/report.html
	@$(BIN)/python -m radflow.summary results/evaluate/metrics.json

# The segmentation demo and the BraTS study each run in a folder of their own under
# studies/ (their data, private/ and results/ apart from the classification demo's).
SEG_STUDY ?= studies/segmentation
LOC_STUDY ?= studies/localization
BRATS_STUDY ?= studies/brats
BRATS_DATA ?= ../shared/data/brats2015
study = $(BIN)/snakemake -s $(CURDIR)/Snakefile -d $(1) --configfile $(CURDIR)/config/config.yaml $(CURDIR)/config/examples/$(2)

demo-segmentation: $(VENV)/.installed
	$(call study,$(SEG_STUDY),brain_mri_segmentation.yaml) --cores $(CORES) --resources gpu=1
	$(call study,$(SEG_STUDY),brain_mri_segmentation.yaml) --cores 1 --report results/report.html
	@$(BIN)/python -m radflow.summary $(SEG_STUDY)/results/evaluate/metrics.json

demo-localization: $(VENV)/.installed
	$(call study,$(LOC_STUDY),lung_ct_localization.yaml) --cores $(CORES) --resources gpu=1
	$(call study,$(LOC_STUDY),lung_ct_localization.yaml) --cores 1 --report results/report.html
	@$(BIN)/python -m radflow.summary $(LOC_STUDY)/results/evaluate/metrics.json

LIDC_DATA ?= ../shared/data/lidc
LUNA16_DATA ?= ../shared/data/luna16
lidc-localization: $(VENV)/.installed
	test -f $(LOC_STUDY)/results/train/fold0/model.pt || $(MAKE) demo-localization
	$(BIN)/python -m radflow.tasks.localization.apply $(LOC_STUDY) $(LIDC_DATA) $(LOC_STUDY)/lidc --config config/examples/lung_ct_localization.yaml
	$(BIN)/python -m radflow.lidc $(LIDC_DATA) $(LOC_STUDY)/lidc/lidc_annotations.csv
	$(BIN)/python -m radflow.luna16 $(LUNA16_DATA)/annotations.csv $(LUNA16_DATA)/annotations_excluded.csv $(LOC_STUDY)/lidc/seriesuids.csv $(LOC_STUDY)/lidc/candidates.csv --out $(LOC_STUDY)/lidc/froc

brats: $(VENV)/.installed
	$(BIN)/python -m radflow.brats $(BRATS_DATA) $(BRATS_STUDY)/data/brats/images.tsv
	$(call study,$(BRATS_STUDY),brats.yaml) --cores $(CORES) --resources gpu=1
	$(call study,$(BRATS_STUDY),brats.yaml) --cores 1 --report results/report.html
	@$(BIN)/python -m radflow.summary $(BRATS_STUDY)/results/evaluate/metrics.json

# plain vs residual networks by depth on the study's data (README: "The residual
# connection, measured"); CONFIG=... to run it on another study's config files
ablation: $(VENV)/.installed
	$(BIN)/snakemake ablation --cores $(CORES) --resources gpu=1 $(if $(CONFIG),--configfile config/config.yaml $(CONFIG))
	$(BIN)/snakemake ablation --cores 1 --report results/ablation/report.html $(if $(CONFIG),--configfile config/config.yaml $(CONFIG))

test: $(VENV)/.installed
	$(BIN)/pytest

# the inner loop (about a minute): no full Snakemake DAG runs, no SLURM cluster
test-fast: $(VENV)/.installed
	$(BIN)/pytest -m "not workflow and not slurm"

lint: $(VENV)/.installed
	$(BIN)/ruff check radflow scripts tests benchmarks
	$(BIN)/ruff format --check radflow scripts tests benchmarks
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

report: $(VENV)/.installed
	$(BIN)/snakemake --cores 1 --report results/report.html

# after `make demo`: write the measured result into README.md's result block
readme-result: $(VENV)/.installed
	$(BIN)/python -m radflow.summary results/evaluate/metrics.json --update-readme README.md

clean:
	rm -rf results .snakemake $(SEG_STUDY)/results $(SEG_STUDY)/.snakemake $(BRATS_STUDY)/results $(BRATS_STUDY)/.snakemake $(LOC_STUDY)/results $(LOC_STUDY)/.snakemake
