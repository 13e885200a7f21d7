"""The real Snakemake DAG on a tiny synthetic cohort: runs end to end, reruns nothing the
second time, reruns exactly the stages a changed parameter affects, leaks no PHI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synth_cohort import planted_phi, text_of

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
ALL_RULES = {
    "synthesize",
    "index",
    "convert",
    "preprocess",
    "split",
    "train",
    "predict",
    "evaluate",
    "figures",
    "case_figures",
    "all",
}

pytestmark = pytest.mark.workflow


def snakemake_cmd(workdir: Path, *args: str, configs=(), targets=()) -> list[str]:
    """The command line of a tiny-study run in `workdir` (extra config files last)."""
    configfiles = [str(REPO / "config" / "config.yaml"), str(TINY), *map(str, configs)]
    return [
        *SNAKEMAKE,
        *targets,  # first: options such as --resources would take them as values
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        *configfiles,
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        *args,
    ]


def snakemake(
    workdir: Path, *args: str, configs=(), targets=(), check=True
) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, *args, configs=configs, targets=targets)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def planned_jobs(workdir: Path, configs=(), *args: str, targets=()) -> dict[str, int]:
    """Job counts per rule from Snakemake's own dry-run summary ("Job stats")."""
    out = snakemake(
        workdir, "--dry-run", *args, "--quiet", "rules", configs=configs, targets=targets
    )
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text[text.index("Job stats:") :]
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"
    }


@pytest.fixture(scope="module")
def study(tiny_study, tmp_path_factory):
    """The tiny study (run once per session, tests/conftest.py), copied with its
    Snakemake records, and its report."""
    workdir = tmp_path_factory.mktemp("study") / "study"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    snakemake(workdir, "--report", "results/report.html")
    return workdir


def test_study_runs_end_to_end(study):
    results = study / "results"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    ens = metrics["ensemble_test"]
    assert ens["n_folds"] == 2 and ens["n_cases"] > 0
    assert 0 <= ens["auroc"]["ci_low"] <= ens["auroc"]["value"] <= ens["auroc"]["ci_high"] <= 1
    for name in (
        "roc",
        "precision_recall",
        "calibration",
        "confusion",
        "training_curves",
        "gradcam_true_positives",
        "gradcam_false_positives",
    ):
        png = results / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (results / "report.html").read_text(errors="replace")
    assert "roc.png" in report and "metrics.tsv" in report
    # captions come from the task's report entries; the training curves' names its monitor
    assert "epoch of best validation AUROC" in report and "Grad-CAM maps" in report
    # the corrupt file, the structured report and the text file were quarantined, not fatal
    quarantine = (results / "index" / "quarantine.tsv").read_text()
    assert "truncated" in quarantine and "SR" in quarantine and "not a DICOM" in quarantine
    # split: every dev patient in exactly one fold, none in the test set too
    split = (results / "split" / "folds.tsv").read_text().splitlines()[1:]
    by_patient: dict[str, set] = {}
    for line in split:
        _, patient, _, part, fold = line.split("\t")
        by_patient.setdefault(patient, set()).add((part, fold))
    assert all(len(v) == 1 for v in by_patient.values())


def test_second_run_does_nothing(study):
    assert planned_jobs(study) == {}
    out = snakemake(study, "--dry-run")
    assert "Nothing to be done" in out.stdout + out.stderr


def _override(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_preprocessing_change_reruns_preprocessing_and_after_only(study, tmp_path):
    tiny = yaml.safe_load(TINY.read_text())
    changed = _override(
        tmp_path, "pre", {"preprocess": {**tiny["preprocess"], "xray_percentiles": [1.0, 99.0]}}
    )
    jobs = planned_jobs(study, [changed])
    assert set(jobs) == {
        "preprocess",
        "train",
        "predict",
        "evaluate",
        "figures",
        "case_figures",
        "all",
    }
    assert jobs["preprocess"] == 2 and jobs["train"] == 2


def test_training_change_reruns_training_and_after_only(study, tmp_path):
    tiny = yaml.safe_load(TINY.read_text())
    changed = _override(tmp_path, "train", {"train": {**tiny["train"], "learning_rate": 0.01}})
    jobs = planned_jobs(study, [changed])
    assert set(jobs) == {"train", "predict", "evaluate", "figures", "case_figures", "all"}


def test_evaluation_change_leaves_models_alone(study, tmp_path):
    changed = _override(tmp_path, "eval", {"evaluate": {"n_boot": 300}})
    assert set(planned_jobs(study, [changed])) == {"evaluate", "figures", "case_figures", "all"}


TOY_TASK = REPO / "tests" / "toy_task.py"


def test_a_registered_second_task_runs_through_the_same_stages(study, tmp_path):
    """A task registered from outside radflow (tests/toy_task.py: the label regressed as
    a number, MSE loss, R² monitor, MAE evaluation, one scatter figure, no calibration,
    no case figures) runs the tiny study: the stages after the split hold no
    classification code. The study's inputs and stages up to the split are copied with
    Snakemake's records of them, so only the task's stages run."""
    workdir = tmp_path / "toy"
    task_stages = {"train", "predict", "evaluate", "figures", "logs", "benchmarks", "report.html"}
    shutil.copytree(
        study,
        workdir,
        symlinks=True,
        ignore=lambda folder, names: (
            task_stages & set(names) if Path(folder) == study / "results" else set()
        ),
    )
    toy = _override(
        tmp_path,
        "toy",
        {
            "task": "toy_regression",
            "task_modules": [str(TOY_TASK)],
            "evaluate": {"calibration": "none"},  # Platt scaling is classification's
        },
    )
    assert planned_jobs(workdir, [toy]) == {
        "train": 2,
        "predict": 2,
        "evaluate": 1,
        "figures": 1,
        "all": 1,
    }
    snakemake(workdir, configs=[toy])
    results = workdir / "results"
    history = (results / "train" / "fold0" / "history.tsv").read_text().splitlines()[0]
    assert "val_r2" in history.split("\t") and "val_auroc" not in history
    columns = (results / "predict" / "fold0.tsv").read_text().splitlines()[0].split("\t")
    assert columns == ["series_pid", "patient_pid", "label", "fold", "split", "score"]
    assert sorted(p.name for p in (results / "evaluate").iterdir()) == [
        "errors.tsv",
        "regression.json",
    ]
    metrics = json.loads((results / "evaluate" / "regression.json").read_text())
    assert metrics["test"]["n_cases"] > 0 and metrics["test"]["mae"] >= 0
    figures = sorted(p.name for p in (results / "figures").iterdir())
    assert figures == ["toy_scatter.png", "training_curves.png"]  # no ROC, no Grad-CAM
    assert all((results / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    assert planned_jobs(workdir, [toy]) == {}
    # the same study with the built-in task wants its own outputs back
    assert set(planned_jobs(workdir)) == {
        "train",
        "predict",
        "evaluate",
        "figures",
        "case_figures",
        "all",
    }


def test_no_planted_phi_in_any_output(study):
    phi = planted_phi(study / "data" / "demo" / "dicom")
    assert len(phi) > 50  # names, ids, birth dates, accession numbers, institutions, UIDs
    files = [p for p in (study / "results").rglob("*") if p.is_file()]
    assert len(files) > 30
    leaks = []
    for path in files:
        blob = text_of(path)
        rel = str(path.relative_to(study))
        for value in phi:
            if value.encode() in blob or value in rel:
                leaks.append(f"{rel}: {value}")
    assert not leaks, "PHI found in outputs:\n" + "\n".join(leaks[:20])


def test_lint_is_clean():
    workdir = REPO
    done = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lints for" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_bad_config_fails_at_once_naming_the_key(tmp_path):
    bad = _override(tmp_path, "bad", {"train": {"epochs": "ten"}})
    done = snakemake(tmp_path, "--dry-run", configs=[bad], check=False)
    assert done.returncode != 0 and "epochs" in done.stderr + done.stdout
    typo = _override(tmp_path, "typo", {"split": {"n_fold": 3}})
    done = snakemake(tmp_path, "--dry-run", configs=[typo], check=False)
    assert done.returncode != 0 and "n_fold" in done.stderr + done.stdout
    missing = _override(
        tmp_path,
        "missing",
        {"synthesize": {"enabled": False}, "data": {"dicom_root": "no/such/folder"}},
    )
    done = snakemake(tmp_path, "--dry-run", configs=[missing], check=False)
    assert done.returncode != 0 and "data.dicom_root" in done.stderr + done.stdout
    assert not (tmp_path / "results").exists()
    shutil.rmtree(tmp_path / "private", ignore_errors=True)


def test_own_data_runs_the_same_study_and_new_files_rerun_the_index(tmp_path):
    """A user's export (here a synthetic one written beforehand) with synthesize off."""
    from synth_cohort import make_cohort

    dicom, labels, lesions = make_cohort(tmp_path / "export", n_patients=28, seed=3)
    own = _override(
        tmp_path,
        "own",
        {
            "synthesize": {"enabled": False},
            "data": {
                "dicom_root": str(dicom),
                "labels_table": str(labels),
                "label_key": "AccessionNumber",
                "label_column": "finding",
                "positive_value": "nodule",
                "annotations_table": str(lesions),
            },
            "deid": {"key_file": str(tmp_path / "secret" / "study.key")},
        },
    )
    workdir = tmp_path / "study"
    workdir.mkdir()
    planned = planned_jobs(workdir, [own])
    assert "synthesize" not in planned and planned["train"] == 2
    snakemake(workdir, configs=[own])
    assert (workdir / "results" / "evaluate" / "metrics.json").exists()
    assert (tmp_path / "secret" / "study.key").stat().st_mode & 0o077 == 0  # private key
    assert planned_jobs(workdir, [own]) == {}
    # a file touched (same content, new mtime) reruns the index, which rewrites the same
    # tables: Snakemake re-plans after the index checkpoint and nothing else reruns
    outputs = [
        p for p in (workdir / "results").rglob("*") if p.is_file() and "index" not in p.parts
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in outputs if "logs" not in p.parts}
    os.utime(next(dicom.rglob("IM*")))
    done = snakemake(workdir, configs=[own])
    assert re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", done.stderr, re.M) == [
        "index",
        "all",  # collects targets only, runs nothing
    ]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a new file in the export changes the tree fingerprint: the index reruns
    extra = next(p for p in dicom.rglob("IM*") if p.stat().st_size > 10_000)
    (dicom / "late_arrival").mkdir()
    shutil.copy(extra, dicom / "late_arrival" / "IM_copy")
    assert "index" in planned_jobs(workdir, [own])


def _add_labelled_image(dicom: Path, template_rel: str, tag: str) -> None:
    """A late-arriving image: a copy of a kept unit with new UIDs (same accession, so
    the labels table already labels it), written into a new folder of the export."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(dicom / template_rel)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["late", tag])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["late-series", tag])
    (dicom / "late").mkdir(exist_ok=True)
    ds.save_as(dicom / "late" / f"IM_{tag}")


def test_new_files_reconvert_only_the_shards_they_fall_in(tmp_path):
    """User data, 4 shards: a new image lands in one shard; after the index reruns (and
    rewrites the other shard tables byte-identically) only that shard is converted and
    preprocessed again, in the same Snakemake run."""
    from synth_cohort import make_cohort

    dicom, labels, _ = make_cohort(tmp_path / "export", n_patients=20, seed=5)
    data = {
        "dicom_root": str(dicom),
        "labels_table": str(labels),
        "annotations_table": None,
    }
    deid = {"key_file": str(tmp_path / "secret" / "study.key")}
    own = _override(
        tmp_path,
        "own",
        {"synthesize": {"enabled": False}, "data": data, "deid": deid, "shards": "auto"},
    )
    workdir = tmp_path / "study"
    workdir.mkdir()
    # shards: auto on this export's few dozen files -> one shard
    assert planned_jobs(workdir, [own])["convert"] == 1
    four = _override(
        tmp_path,
        "four",
        {"synthesize": {"enabled": False}, "data": data, "deid": deid, "shards": 4},
    )
    shards = [f"shard-{k:03d}" for k in range(4)]
    targets = [f"results/preprocessed/{s}" for s in shards]
    snakemake(workdir, configs=[four], targets=targets)
    tables = {s: workdir / "private" / "index" / f"{s}.tsv" for s in shards}
    before = {s: tables[s].read_bytes() for s in shards}

    def stamps():
        return {
            s: (
                (workdir / "results" / "nifti" / s / "manifest.tsv").stat().st_mtime_ns,
                (workdir / "results" / "preprocessed" / s / "manifest.tsv").stat().st_mtime_ns,
            )
            for s in shards
        }

    stamps_before = stamps()
    from radflow import conventions as C
    from radflow.dicom.index import read_shard_files

    template = next(
        path
        for s in shards
        for path in read_shard_files(tables[s])[C.PATH]  # a file of a kept unit
    )
    _add_labelled_image(dicom, template, "1")
    assert planned_jobs(workdir, [four]).get("index") == 1  # the tree fingerprint changed
    done = snakemake(workdir, configs=[four], targets=targets)
    changed = {s for s in shards if tables[s].read_bytes() != before[s]}
    assert len(changed) == 1, changed  # one new unit, one shard
    ran = set(
        re.findall(r"rule convert:\n(?:\s+\w+:.*\n)*?\s+wildcards: shard=(shard-\d+)", done.stderr)
    )
    reran = {s for s in shards if stamps()[s] != stamps_before[s]}
    assert ran == reran == changed, (ran, reran, changed)
    assert planned_jobs(workdir, [four], targets=targets) == {}


def test_killed_run_resumes_without_redoing_finished_stages(study, tmp_path):
    """SIGKILL the whole Snakemake process group in the middle of training, then run the
    documented recovery (`--unlock`, then the same command again):
    index/convert/preprocess/split are not redone, no half-written output looked
    finished, and the results equal the uninterrupted `study` run's."""
    import signal
    import time

    workdir = tmp_path / "killed"
    workdir.mkdir()
    cmd = snakemake_cmd(workdir)
    log = (tmp_path / "first_run.log").open("w")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=log, start_new_session=True)
    train_dir = workdir / "results" / "train"
    deadline = time.monotonic() + 300
    try:
        # the staging checkpoint appears after the first epoch of a fold: mid-training
        while not any(train_dir.glob("fold*/.model.pt.in-progress")):
            assert proc.poll() is None, (tmp_path / "first_run.log").read_text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing looks finished that is not: the fold killed mid-training has its staging
    # checkpoint but no model.pt; any model.pt comes with its history
    staged = [p.parent for p in train_dir.glob("fold*/.model.pt.in-progress")]
    assert staged and not any((fold / "model.pt").exists() for fold in staged)
    assert all((p.parent / "history.tsv").exists() for p in train_dir.glob("fold*/model.pt"))
    finished = [
        workdir / "results" / "index" / "series.tsv",
        *sorted((workdir / "results" / "nifti").glob("shard-*/manifest.tsv")),
        *sorted((workdir / "results" / "preprocessed").glob("shard-*/manifest.tsv")),
        workdir / "results" / "split" / "folds.tsv",
    ]
    assert len(finished) == 6
    mtimes = {p: p.stat().st_mtime_ns for p in finished}

    # the killed Snakemake left its lock: a new run refuses to start until --unlock
    locked = snakemake(workdir, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock")
    jobs = planned_jobs(workdir)
    assert not {"synthesize", "index", "convert", "preprocess", "split"} & set(jobs), jobs
    assert jobs["train"] >= 1
    # the same command again (profiles/default sets rerun-incomplete)
    snakemake(workdir)
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes
    assert planned_jobs(workdir) == {}

    import torch

    for fold in (0, 1):
        ours = torch.load(train_dir / f"fold{fold}" / "model.pt", weights_only=True)
        ref = torch.load(
            study / "results" / "train" / f"fold{fold}" / "model.pt", weights_only=True
        )
        assert ours["epoch"] == ref["epoch"]
        for name, tensor in ref["state_dict"].items():
            assert torch.equal(ours["state_dict"][name], tensor), name
    for rel in ("split/folds.tsv", "predict/fold0.tsv", "evaluate/metrics.json"):
        assert (workdir / "results" / rel).read_bytes() == (study / "results" / rel).read_bytes()
