"""The residual ablation's pieces (radflow.ablation, its figures) on hand-made job files;
the Snakemake target itself runs in tests/test_workflow_ablation.py."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from radflow import figures as F  # noqa: E402
from radflow.ablation import (  # noqa: E402
    ENSEMBLE,
    JOB_FILES,
    ablation_folds,
    first_last_gradient_ratio,
    job_from_folder,
    monitor_with_ci,
    summarise,
    variant_settings,
)
from radflow.config import ConfigError  # noqa: E402
from radflow.metrics import bootstrap_ci, roc_auc  # noqa: E402
from radflow.tables import write_tsv  # noqa: E402
from radflow.tasks import get_task  # noqa: E402
from radflow.train import TrainSettings  # noqa: E402

TASK = get_task("classification")
PNG = b"\x89PNG\r\n\x1a\n"


def test_folds_default_to_the_study_and_unknown_ones_are_refused():
    assert ablation_folds(None, [0, 1, 2]) == [0, 1, 2]
    assert ablation_folds([2, 0], [0, 1, 2]) == [0, 2]
    with pytest.raises(ConfigError, match=r"ablation.folds: \[5\]"):
        ablation_folds([0, 5], [0, 1, 2])


def test_a_job_differs_from_the_study_only_in_depth_and_variant():
    study = TrainSettings()
    plain = variant_settings(study, "plain", 34)
    assert plain.model.depth == 34 and plain.model.residual is False
    assert dataclasses.replace(plain, model=study.model) == study
    assert variant_settings(study, "residual", 10).model.residual is True
    with pytest.raises(ValueError, match="variant"):
        variant_settings(study, "highway", 10)


def test_job_folders_name_variant_depth_and_fold(tmp_path):
    job = job_from_folder(tmp_path / "plain101" / "fold3")
    assert (job.variant, job.depth, job.fold) == ("plain", 101, 3)
    with pytest.raises(ValueError, match="not an ablation job folder"):
        job_from_folder(tmp_path / "dense18" / "fold0")


def test_monitor_ci_resamples_patients_like_the_study_evaluation():
    rng = np.random.default_rng(0)
    n = 60
    probs = np.sort(rng.random(n))  # sorted: the positions keep the cases' order
    labels = (rng.random(n) < probs).astype(int)
    patients = np.repeat(np.arange(n // 2), 2)
    got = monitor_with_ci(TASK, labels, probs, patients, n_boot=300, alpha=0.05, seed=4)
    want = bootstrap_ci(roc_auc, labels, probs, groups=patients, n_boot=300, seed=4)
    assert got == {"value": want.point, "ci_low": want.low, "ci_high": want.high}


def _gradients(first: float, last: float) -> pd.DataFrame:
    rows = []
    for snapshot, step in (("init", 0), ("early", 2), ("end", 5)):
        for index, norm in ((1, first), (2, 1.0), (3, last)):
            rows.append((snapshot, step, index, f"l{index}", "conv", "main", norm))
        rows.append((snapshot, step, 2, "proj", "conv", "projection", 9.0))
    return pd.DataFrame(
        rows, columns=["snapshot", "step", "index", "layer", "kind", "path", "grad_norm"]
    )


def test_first_last_gradient_ratio_reads_main_path_layers():
    table = _gradients(0.01, 2.0)
    assert first_last_gradient_ratio(table, "early") == pytest.approx(0.005)
    assert np.isnan(first_last_gradient_ratio(_gradients(1.0, 0.0), "init"))


@pytest.fixture
def jobs(tmp_path):
    """Eight finished jobs: plain/residual x depth 10/18 x folds 0/1, on 40 test cases."""
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    cases = pd.DataFrame(
        {
            "series_pid": [f"s{i:02d}" for i in range(40)],
            "patient_pid": [f"p{i // 2:02d}" for i in range(40)],
            "label": labels,
        }
    )
    made = []
    for variant in ("plain", "residual"):
        for depth in (10, 18):
            for fold in (0, 1):
                folder = tmp_path / f"{variant}{depth}" / f"fold{fold}"
                folder.mkdir(parents=True)
                signal = 0.3 if variant == "plain" else 0.6
                out = np.clip(labels * signal + rng.random(40) * 0.7, 0, 1)
                write_tsv(cases.assign(output=out), folder / JOB_FILES["test"])
                epochs = np.arange(1, 4)
                write_tsv(
                    pd.DataFrame(
                        {
                            "fold": fold,
                            "epoch": epochs,
                            "train_loss": [0.7, 0.5, 0.4],
                            "val_loss": [0.69, 0.6, 0.65],
                            "val_auroc": [0.6, 0.8, 0.7],
                            "lr": 1e-3,
                            "epoch_time_s": 2.0,
                        }
                    ),
                    folder / JOB_FILES["history"],
                )
                steps = np.arange(6 + fold * 3)  # fold 1: 3 steps an epoch, fold 0: 2
                write_tsv(
                    pd.DataFrame(
                        {
                            "step": steps,
                            "epoch": steps // (2 + fold) + 1,
                            "train_loss": 0.7 - 0.02 * steps,
                        }
                    ),
                    folder / JOB_FILES["steps"],
                )
                write_tsv(_gradients(0.1 * (fold + 1), 1.0), folder / JOB_FILES["gradients"])
                made.append(job_from_folder(folder))
    return made


def test_summary_has_each_job_and_an_ensemble_per_network(jobs):
    parameters = {
        (v, d): d * 1000 + (v == "plain") for v in ("plain", "residual") for d in (10, 18)
    }
    summary = summarise(jobs, TASK, parameters=parameters, n_boot=200, alpha=0.05)
    assert len(summary) == 8 + 4
    row = summary[(summary["variant"] == "plain") & (summary["depth"] == 18)]
    single = row[row["fold"] == "1"].iloc[0]
    test = jobs[3].read("test")  # plain18 fold1
    assert (jobs[3].variant, jobs[3].depth, jobs[3].fold) == ("plain", 18, 1)
    assert single["test_auroc"] == pytest.approx(roc_auc(test["label"], test["output"]))
    assert single["test_auroc_ci_low"] <= single["test_auroc"] <= single["test_auroc_ci_high"]
    assert single["best_epoch"] == 2 and single["best_val_auroc"] == 0.8
    assert single["final_train_loss"] == 0.4 and single["train_time_s"] == 6.0
    assert single["grad_first_last_early"] == pytest.approx(0.2)
    assert single["parameters"] == 18001 and single["n_test_cases"] == 40
    ensemble = row[row["fold"] == ENSEMBLE].iloc[0]
    mean = (jobs[2].read("test")["output"] + test["output"]) / 2
    assert ensemble["test_auroc"] == pytest.approx(roc_auc(test["label"], mean))
    assert np.isnan(ensemble["best_epoch"])  # per-job columns stay empty


def test_ablation_figures_draw_the_fold_means(jobs, tmp_path):
    keyed = [(job, {"variant": job.variant, "depth": job.depth, "fold": job.fold}) for job in jobs]
    steps = pd.concat([j.read("steps").assign(**k) for j, k in keyed], ignore_index=True)
    histories = pd.concat(
        [j.read("history").drop(columns="fold").assign(**k) for j, k in keyed], ignore_index=True
    )
    gradients = pd.concat([j.read("gradients").assign(**k) for j, k in keyed], ignore_index=True)

    fig = F.plot_ablation_training(steps, histories, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG
    plain_ax, residual_ax = fig.axes[:2]
    assert plain_ax.get_title() == "Plain networks"
    # per depth: a thin per-step line and a bold validation line on each panel
    assert len(residual_ax.get_lines()) == 4
    thin = plain_ax.get_lines()[0]  # plain-10: folds of 2 and 3 steps an epoch line up
    x, y = thin.get_data()
    assert x[0] == pytest.approx(1 / 3) and x[-1] == pytest.approx(3.0)
    bold = plain_ax.get_lines()[1]
    assert list(bold.get_ydata()) == pytest.approx([0.69, 0.6, 0.65])

    fig = F.plot_ablation_gradients(gradients, tmp_path / "grad.png")
    assert [ax.get_yscale() for ax in fig.axes[:3]] == ["log"] * 3
    line = fig.axes[0].get_lines()[0]  # plain-10 at init: median over folds 0.1 and 0.2
    assert list(line.get_xdata()) == [1, 2, 3]  # main path only
    assert list(line.get_ydata()) == pytest.approx([0.15, 1.0, 1.0])
    assert line.get_linestyle() == "--"

    summary = summarise(
        jobs,
        TASK,
        parameters={(v, d): 1 for v in ("plain", "residual") for d in (10, 18)},
        n_boot=100,
        alpha=0.05,
    )
    fig = F.plot_ablation_test_metric(
        summary,
        tmp_path / "metric.png",
        monitor="val_auroc",
        monitor_label="AUROC",
        monitor_axis="AUROC (fraction)",
    )
    assert (tmp_path / "metric.png").read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "18"]
    ensemble = summary[(summary["fold"] == ENSEMBLE) & (summary["variant"] == "residual")]
    drawn = [line for line in ax.get_lines() if line.get_markersize() == 7]
    assert list(drawn[1].get_ydata()) == pytest.approx(ensemble["test_auroc"].tolist())
