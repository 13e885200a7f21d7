"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """The tiny study (config/config.yaml + tests/configs/tiny.yaml on 2 cores, one GPU
    slot), run once per session: test_workflow, test_workflow_ablation and test_slurm all
    need this same DAG's outputs, and each run of it costs about a minute on 2 cores.
    Read-only: a module that adds files (a report, the ablation) works on a copy made with
    `shutil.copytree(tiny_study, dest, symlinks=True)`, which keeps the files' mtimes and
    Snakemake's records, so the copy is complete for Snakemake too."""
    from test_workflow import snakemake

    workdir = tmp_path_factory.mktemp("tiny_study")
    snakemake(workdir)
    return workdir
