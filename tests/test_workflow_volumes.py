"""The volumes layout in the real Snakemake DAG: a task that asks for it (here a
classification task with preprocessed_layout "volumes", standing in for segmentation)
gets index -> convert -> split -> preprocess_plan -> preprocess_volumes on an images
table of two-channel NIfTI cases with masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from radflow import conventions as C
from radflow.data import VolumeStore
from radflow.geometry import restore_native
from radflow.tables import read_tsv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow

TASK_MODULE = """
from radflow.tasks import register
from radflow.tasks.classification import BinaryClassification


@register
class VolumesToy(BinaryClassification):
    name = "volumes_toy"
    preprocessed_layout = "volumes"
"""


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "study.yaml"),
           "--cores", "2", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def _case(rng, spacing_z: float):
    """(flair, t1, mask) (i, j, k) of a head 24 x 24 x 42 mm, slices at `spacing_z`; the
    tumour spans 24 mm in z, so that it survives slices of up to 3 mm twice resampled."""
    i, j, k = np.indices((24, 24, int(round(42 / spacing_z))), dtype=float)
    k = k * spacing_z  # mm
    head = ((i - 12) / 10) ** 2 + ((j - 12) / 11) ** 2 + ((k - 21) / 19) ** 2 < 1
    tumour = ((i - 14) / 6) ** 2 + ((j - 11) / 6) ** 2 + ((k - 21) / 12) ** 2 < 1
    oedema = head & ((i - 7) ** 2 + (j - 13) ** 2 < 3**2) & ~tumour
    mask = np.where(head & tumour, 1, np.where(oedema, 2, 0))
    flair = np.where(head, rng.normal(400, 30, head.shape) + 200 * tumour, 0.0)
    t1 = np.where(head, rng.normal(900, 50, head.shape) - 300 * tumour, 0.0)
    return flair.astype(np.float32), t1.astype(np.float32), mask.astype(np.uint8)


def test_volumes_layout_plans_on_training_cases_and_preprocesses_every_shard(tmp_path):
    rng = np.random.default_rng(5)
    data = tmp_path / "input"
    data.mkdir()
    rows = []

    def add_case(n: int, spacing_z: float) -> None:
        affine = np.diag([-1.0, -1.0, spacing_z, 1.0])  # stored LPS
        flair, t1, mask = _case(rng, spacing_z)
        for name, volume in (("flair", flair), ("t1", t1), ("mask", mask)):
            nib.save(nib.Nifti1Image(volume, affine), data / f"c{n}_{name}.nii.gz")
        for channel in ("flair", "t1"):
            rows.append({"patient_id": f"P{n}", "channel": channel, "label": str(n % 2),
                         "path": f"c{n}_{channel}.nii.gz", "mask": f"c{n}_mask.nii.gz"})  # fmt: skip
        pd.DataFrame(rows).to_csv(data / "images.tsv", sep="\t", index=False)

    for n in range(10):
        add_case(n, 3.0 if n in (0, 5) else 2.0)  # the median is 2 mm whatever the split
    (tmp_path / "volumes_task.py").write_text(TASK_MODULE)
    config = {
        "task": "volumes_toy",
        "task_modules": ["volumes_task.py"],
        "synthesize": {"enabled": False},
        "deid": {"key_file": "private/key"},
        "shards": 2,
        "threads": {"index": 1, "convert": 1, "preprocess": 2},
        "data": {"dicom_root": None, "labels_table": None, "annotations_table": None,
                 "images_table": "input/images.tsv", "label_column": "label",
                 "positive_value": "1", "modality": "MR"},
        "split": {"n_folds": 2, "test_fraction": 0.3},
    }  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    preprocessed = tmp_path / "results" / "preprocessed"
    targets = [f"results/preprocessed/{name}"
               for name in (C.PREPROCESS_PLAN, C.shard_name(0), C.shard_name(1))]  # fmt: skip
    done = _snakemake(tmp_path, *targets)
    assert done.returncode == 0, done.stderr[-4000:]

    folds = read_tsv(tmp_path / "results" / "split" / "folds.tsv")
    training = set(folds.loc[folds[C.SPLIT] != C.SPLIT_TEST, C.SERIES_PID])
    assert 0 < len(training) < len(folds)
    plan = json.loads((preprocessed / C.PREPROCESS_PLAN).read_text())
    fingerprint = json.loads((preprocessed / C.PREPROCESS_FINGERPRINT).read_text())
    planned = {case[C.SERIES_PID]: case["spacing_mm"] for case in fingerprint["cases"]}
    assert set(planned) == training
    assert plan["target_spacing_mm"] == list(np.median(list(planned.values()), axis=0))
    assert plan["n_channels"] == 2

    store = VolumeStore(sorted(preprocessed.glob("shard-*")))
    assert set(store.cases) == set(folds[C.SERIES_PID])  # test cases are preprocessed too
    for pid in store.cases:
        assert store.image(pid).shape[0] == 2 and store.label_voxels(pid).keys() == {1, 2}
        nifti = next((tmp_path / "results" / "nifti").glob(f"*/{pid}{C.MASK_SUFFIX}"))
        original = np.asarray(nib.load(nifti).dataobj)
        restored = restore_native(store.mask(pid), store.row(pid))
        overlap = 2 * ((restored == 1) & (original == 1)).sum()
        assert overlap / ((restored == 1).sum() + (original == 1).sum()) > 0.9

    # a new patient: the split changes, the plan does not (the same bytes: Snakemake
    # compares the checksum it recorded), so only the shard that receives the case is
    # preprocessed again
    shards = sorted(preprocessed.glob("shard-*"))
    before = {shard: (shard / C.MANIFEST).stat().st_mtime_ns for shard in shards}
    plan_written = (preprocessed / C.PREPROCESS_PLAN).read_bytes()
    add_case(10, 2.0)
    done = _snakemake(tmp_path, *targets)
    assert done.returncode == 0, done.stderr[-4000:]
    (new_case,) = set(VolumeStore(shards).cases) - set(store.cases)
    assert (preprocessed / C.PREPROCESS_PLAN).read_bytes() == plan_written
    for shard, mtime in before.items():
        redone = (shard / C.MANIFEST).stat().st_mtime_ns != mtime
        assert redone == (shard / f"{new_case}{C.IMAGE_ARRAY_SUFFIX}").exists(), shard.name

    # another split (no new data): the plan is redone from other training cases, gives
    # the same spacing, and no shard is preprocessed again
    before = {shard: (shard / C.MANIFEST).stat().st_mtime_ns for shard in shards}
    folds = (tmp_path / "results" / "split" / "folds.tsv").read_bytes()
    config["seed"] = 7  # another test set
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    done = _snakemake(tmp_path, *targets)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "results" / "split" / "folds.tsv").read_bytes() != folds
    assert (preprocessed / C.PREPROCESS_PLAN).read_bytes() == plan_written
    assert {shard: (shard / C.MANIFEST).stat().st_mtime_ns for shard in shards} == before

    again = _snakemake(tmp_path, *targets)
    assert "Nothing to be done" in again.stdout + again.stderr
