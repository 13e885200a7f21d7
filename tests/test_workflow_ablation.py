"""The residual ablation's Snakemake target on the tiny study: it runs, writes every job's
files, the summary, the figures and the efficiency table into the report; it leaves the
study's outputs byte for byte and plans only what a config change asks for."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.workflow

ABLATION = {"ablation": {"depths": [10, 18], "folds": [0], "early_steps": 2}}
PNG = b"\x89PNG\r\n\x1a\n"
JOB_FILES = ["model.pt", "history.tsv", "steps.tsv", "gradients.tsv", "test_predictions.tsv"]


def _config(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _ablation_config(tmp_path: Path, name: str, **changes) -> Path:
    return _config(tmp_path, name, {"ablation": {**ABLATION["ablation"], **changes}})


def _study_files(workdir: Path) -> dict[str, tuple[str, int]]:
    """(SHA-256, mtime) of every file of the study, the ablation's own folders aside."""
    ablation = ("results/ablation", "results/logs/ablation", "results/benchmarks/ablation")
    files = {}
    for top in ("results", "private", "data"):
        for path in sorted((workdir / top).rglob("*")):
            rel = path.relative_to(workdir).as_posix()
            if path.is_file() and not rel.startswith(ablation):
                files[rel] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                    path.stat().st_mtime_ns,
                )
    return files


@pytest.fixture(scope="module")
def ablated(tiny_study, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation") / "study"
    # the tiny study first: a copy of the session's run (tests/conftest.py), mtimes and
    # Snakemake's records kept (still complete: see the second test)
    shutil.copytree(tiny_study, workdir, symlinks=True)
    before = _study_files(workdir)
    config = _config(workdir, "ablation_config", ABLATION)
    snakemake(workdir, configs=[config], targets=["ablation"])
    snakemake(
        workdir, "--report", "results/ablation/report.html", configs=[config], targets=["ablation"]
    )
    return workdir, before, config


def test_every_job_writes_its_files_and_the_summary_collects_them(ablated):
    workdir, _, _ = ablated
    out = workdir / "results" / "ablation"
    jobs = ["plain10", "plain18", "residual10", "residual18"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == jobs
    for job in jobs:
        assert sorted(p.name for p in (out / job).iterdir()) == ["fold0"]
        assert sorted(p.name for p in (out / job / "fold0").iterdir()) == sorted(JOB_FILES)
    gradients = pd.read_csv(out / "plain18" / "fold0" / "gradients.tsv", sep="\t")
    assert set(gradients["snapshot"]) == {"init", "early", "end"}
    assert gradients.groupby("snapshot")["step"].first()["early"] == 2
    main = gradients[(gradients["snapshot"] == "end") & (gradients["path"] == "main")]
    assert main["index"].tolist() == list(range(1, 19))
    steps = pd.read_csv(out / "plain18" / "fold0" / "steps.tsv", sep="\t")
    history = pd.read_csv(out / "plain18" / "fold0" / "history.tsv", sep="\t")
    assert set(steps["epoch"]) == set(history["epoch"]) == {1, 2}  # tiny.yaml: 2 epochs
    assert {"train_loss", "val_loss", "val_auroc"} <= set(history.columns)
    test = pd.read_csv(out / "residual10" / "fold0" / "test_predictions.tsv", sep="\t")
    study_test = pd.read_csv(workdir / "results" / "predict" / "fold0.tsv", sep="\t")
    assert sorted(test["series_pid"]) == sorted(
        study_test.loc[study_test["split"] == "test", "series_pid"]
    )

    summary = pd.read_csv(out / "summary.tsv", sep="\t", dtype={"fold": str})
    assert len(summary) == 4 + 4  # one job and one ensemble row per network
    assert set(summary["fold"]) == {"0", "ensemble"}
    assert summary["test_auroc"].between(0, 1).all()
    assert (summary["test_auroc_ci_low"] <= summary["test_auroc"]).all()
    by_net = summary[summary["fold"] == "0"].set_index(["variant", "depth"])["parameters"]
    assert by_net["plain", 18] == by_net["residual", 18] > by_net["residual", 10]
    for name in ("training_loss", "gradient_norms", "test_metric"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    efficiency = pd.read_csv(out / "efficiency.tsv", sep="\t")
    assert sorted(efficiency["model"]) == sorted(jobs)
    assert efficiency["input_shape"].unique().tolist() == ["1x48x48"]  # the study's shape
    report = (out / "report.html").read_text(errors="replace")
    assert "Residual ablation" in report and "efficiency.tsv" in report
    assert "gradient_norms.png" in report and "He et al." in report


def test_the_study_outputs_are_untouched_and_still_complete(ablated):
    workdir, before, _ = ablated
    assert _study_files(workdir) == before
    assert planned_jobs(workdir) == {}  # `all` does not include the ablation


def test_a_new_depth_or_fold_plans_only_its_own_jobs(ablated, tmp_path):
    workdir, _, config = ablated
    assert planned_jobs(workdir, [config], targets=["ablation"]) == {}
    deeper = _ablation_config(tmp_path, "deeper", depths=[10, 18, 34])
    assert planned_jobs(workdir, [deeper], targets=["ablation"]) == {
        "ablation_train": 2,  # plain34, residual34
        "ablation_summary": 1,
        "ablation_efficiency": 1,
        "ablation": 1,
    }
    more_folds = _ablation_config(tmp_path, "folds", folds=None)  # all: 0 and 1
    assert planned_jobs(workdir, [more_folds], targets=["ablation"]) == {
        "ablation_train": 4,
        "ablation_summary": 1,
        "ablation": 1,
    }
    only_plain = _ablation_config(tmp_path, "plain", variants=["plain"])
    assert set(planned_jobs(workdir, [only_plain], targets=["ablation"])) == {
        "ablation_summary",
        "ablation_efficiency",
        "ablation",
    }


def test_the_study_depth_leaves_the_ablation_alone_and_training_settings_do_not(ablated, tmp_path):
    workdir, _, config = ablated
    depth = _config(tmp_path, "depth", {"model": {"depth": 34}})
    assert planned_jobs(workdir, [config, depth], targets=["ablation"]) == {}
    tiny_train = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
    rate = _config(tmp_path, "rate", {"train": {**tiny_train["train"], "learning_rate": 0.01}})
    jobs = planned_jobs(workdir, [config, rate], targets=["ablation"])
    assert jobs["ablation_train"] == 4 and "train" not in jobs
