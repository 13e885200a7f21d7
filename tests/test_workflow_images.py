"""The real Snakemake DAG on an images table: a tiny PNG data set with an official split
table and a NIfTI data set with two channels, run as a user would (layered over
config/config.yaml); nothing identifying reaches results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow


def _disc(shape, positive, rng):
    """A learnable image: a bright disc on noise for positives, a bright bar otherwise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.uniform(0.35, 0.65, 2) * np.array(shape)
    image = rng.normal(0.3, 0.05, shape)
    if positive:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < (shape[0] / 8) ** 2] = 0.9
    else:
        image[np.abs(yy - cy) < shape[0] / 16] = 0.9
    return np.clip(image, 0, 1)


def _run(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "study.yaml"),
           "--cores", "2", "--resources", "gpu=1"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


TINY = {
    "synthesize": {"enabled": False},
    "deid": {"key_file": "private/key"},
    "shards": 2,
    "threads": {
        "index": 2,
        "convert": 1,
        "preprocess": 1,
        "train": 2,
        "predict": 1,
        "figures": 1,
    },  # fmt: skip
    "model": {"depth": 18, "base_width": 8},
    "train": {"epochs": 2, "batch_size": 8},
    "evaluate": {"n_boot": 200},
    "figures": {"cam_cases": 2},
}


def test_png_table_with_official_split_runs_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "input" / "images"
    images.mkdir(parents=True)
    rows, split_rows = [], []
    for i in range(36):
        patient = f"Jane^Roe{i:02d}"
        positive = i % 2 == 1
        for view in ("a", "b") if i < 6 else ("a",):  # some patients with two images
            pixels = (_disc((80, 64), positive, rng) * 65535).astype(np.uint16)
            name = f"{patient}_{view}.png"
            Image.fromarray(pixels).save(images / name)
            rows.append({"subject": patient, "path": f"images/{name}",
                         "finding": "pneumonia" if positive else "normal"})  # fmt: skip
        split_rows.append({"subject": patient,
                           "split": "test" if i >= 28 else "val" if i >= 20 else "train"})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "input" / "images.csv", index=False)
    pd.DataFrame(split_rows).to_csv(tmp_path / "input" / "split.csv", index=False)
    config = {
        **TINY,
        "data": {"dicom_root": None, "labels_table": None, "annotations_table": None,
                 "images_table": "input/images.csv", "columns": {"patient": "subject"},
                 "label_column": "finding", "positive_value": "pneumonia", "modality": "DX"},
        "preprocess": {"target_shape_px": [32, 32]},
        "split": {"table": "input/split.csv"},
    }  # fmt: skip
    done = _run(tmp_path, config)
    assert done.returncode == 0, done.stderr[-4000:]
    results = tmp_path / "results"
    folds = pd.read_csv(results / "split" / "folds.tsv", sep="\t")
    assert folds.groupby("patient_pid")["split"].nunique().max() == 1
    assert folds["fold"].nunique() == 3  # train only (-2), val fold 0, test (-1)
    assert (folds["split"] == "test").sum() == 8
    assert (results / "evaluate" / "metrics.json").is_file()
    assert (results / "figures" / "roc.png").is_file()
    # the official split's val patients are fold 0's validation set, nothing else
    predictions = pd.read_csv(results / "predict" / "fold0.tsv", sep="\t")
    assert (predictions["split"] == "val").sum() == 8
    for path in results.rglob("*"):
        if path.is_file() and path.suffix in (".tsv", ".json", ".log", ".txt"):
            text = path.read_text(errors="replace")
            assert "Jane" not in text and "Roe" not in text, path
    # a second run does nothing
    again = _run(tmp_path, config)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_nifti_two_channel_table_runs_end_to_end(tmp_path):
    """3D MR-like cases with two channels on different grids, one case missing a channel
    (quarantined, the study goes on)."""
    rng = np.random.default_rng(1)
    data = tmp_path / "input"
    data.mkdir()
    rows = []
    for i in range(24):
        positive = i % 2 == 1
        volume = np.stack([_disc((20, 20), positive, rng) for _ in range(8)])  # (z, y, x)
        flair = nib.Nifti1Image((volume.T * 1000).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1]))
        t1 = nib.Nifti1Image((volume.T[::2, ::2, :] * 500).astype(np.int16),
                             np.diag([2.0, 2.0, 2.0, 1]))  # fmt: skip
        nib.save(flair, data / f"s{i}_flair.nii.gz")
        nib.save(t1, data / f"s{i}_t1.nii.gz")
        label = "1" if positive else "0"
        rows.append({"patient_id": f"S{i}", "channel": "flair", "path": f"s{i}_flair.nii.gz",
                     "label": label})  # fmt: skip
        if i != 0:
            rows.append({"patient_id": f"S{i}", "channel": "t1", "path": f"s{i}_t1.nii.gz",
                         "label": label})  # fmt: skip
    pd.DataFrame(rows).to_csv(data / "images.tsv", sep="\t", index=False)
    config = {
        **TINY,
        "data": {"dicom_root": None, "labels_table": None, "annotations_table": None,
                 "images_table": "input/images.tsv", "label_column": "label",
                 "positive_value": "1", "modality": "MR"},
        "preprocess": {"target_shape_px": [8, 16, 16]},
        "split": {"n_folds": 2, "test_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 4},
    }  # fmt: skip
    done = _run(tmp_path, config)
    assert done.returncode == 0, done.stderr[-4000:]
    quarantine = pd.read_csv(tmp_path / "results" / "index" / "quarantine.tsv", sep="\t")
    assert quarantine["reason"].str.startswith("missing channel t1").sum() == 1
    arrays = sorted((tmp_path / "results" / "preprocessed").glob("*/images.npy"))
    assert {np.load(a, mmap_mode="r").shape[1:] for a in arrays} == {(2, 8, 16, 16)}
    assert (tmp_path / "results" / "evaluate" / "metrics.json").is_file()
