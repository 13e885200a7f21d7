"""The volumes layout's plan (radflow.plan): the target spacing is decided by the training
cases only, from headers, on the canonical axes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.dicom.nifti import write_nifti
from radflow.plan import plan_preprocessing, read_plan, target_spacing, write_json


def _write_case(folder: Path, pid: str, spacing_ijk, shape_ijk=(8, 6, 4), *, sagittal=False):
    """A converted 3D unit with the given voxel spacing along its stored axes (i, j, k);
    `sagittal`: its i axis runs anterior, j inferior, k right."""
    columns = (
        np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float) if sagittal else np.diag([-1.0, -1, 1])
    )
    affine = np.eye(4)
    affine[:3, :3] = columns * np.asarray(spacing_ijk, float)[None, :]
    write_nifti(folder / f"{pid}{C.NIFTI_SUFFIX}", np.zeros(shape_ijk[::-1], np.int16), affine)
    sidecar = {"Modality": "MR", "n_channels": 1}
    (folder / f"{pid}{C.SIDECAR_SUFFIX}").write_text(json.dumps(sidecar))


def _study(tmp_path: Path, cases: dict[str, tuple[str, tuple, bool]]) -> tuple[list[Path], Path]:
    """Two converted shards and a split table: {pid: (split, spacing (i, j, k), sagittal)}."""
    shards = [tmp_path / "nifti" / C.shard_name(k) for k in range(2)]
    manifests = [[], []]
    for shard in shards:
        shard.mkdir(parents=True)
    for n, (pid, (_split, spacing, sagittal)) in enumerate(cases.items()):
        _write_case(shards[n % 2], pid, spacing, sagittal=sagittal)
        manifests[n % 2].append({C.SERIES_PID: pid, C.STATUS: C.STATUS_OK, C.REASON: "", "ndim": 3})
    for shard, rows in zip(shards, manifests, strict=True):
        columns = [C.SERIES_PID, C.STATUS, C.REASON, "ndim"]
        pd.DataFrame(rows, columns=columns).to_csv(shard / C.MANIFEST, sep="\t", index=False)
    folds = pd.DataFrame(
        {C.SERIES_PID: list(cases), C.PATIENT_PID: [f"pat-{pid}" for pid in cases],
         C.LABEL: 0, C.SPLIT: [v[0] for v in cases.values()],
         C.FOLD: [-1 if v[0] == C.SPLIT_TEST else 0 for v in cases.values()]}
    )  # fmt: skip
    folds.to_csv(tmp_path / "folds.tsv", sep="\t", index=False)
    return shards, tmp_path / "folds.tsv"


def test_target_spacing_is_the_median_of_training_cases_only(tmp_path):
    cases = {
        "ser-a": ("dev", (0.8, 0.8, 2.0), False),
        "ser-b": ("dev", (1.0, 1.0, 3.0), False),
        "ser-c": ("dev", (1.2, 0.9, 2.5), False),
        # stored sagittally: spacing (i, j, k) = (A, I, R) = (0.9, 2.2, 0.7) -> z 2.2, y 0.9, x 0.7
        "ser-d": ("dev", (0.9, 2.2, 0.7), True),
        # a held-out test case with an extreme spacing: it must not move the plan
        "ser-t": ("test", (5.0, 5.0, 9.0), False),
    }
    shards, folds = _study(tmp_path, cases)
    plan, fingerprint = plan_preprocessing(shards, folds)
    # (z, y, x) medians over a, b, c, d: z of 2, 3, 2.5, 2.2; y of .8, 1, .9, .9; x of .8, 1, 1.2, .7
    assert plan["target_spacing_mm"] == pytest.approx([2.35, 0.9, 0.9])
    assert plan["target_spacing_from"] == "median of the training cases' spacings"
    assert plan["n_channels"] == 1 and plan["layout"] == C.LAYOUT_VOLUMES
    assert fingerprint["training_cases"] == 4 and fingerprint["test_rows_left_out"] == 1
    assert "ser-t" not in {case[C.SERIES_PID] for case in fingerprint["cases"]}
    sagittal = next(c for c in fingerprint["cases"] if c[C.SERIES_PID] == "ser-d")
    assert sagittal["spacing_mm"] == pytest.approx([2.2, 0.9, 0.7])
    assert sagittal["shape"] == [6, 8, 4]  # (z, y, x) = stored (j, i, k)
    # the test case alone changes nothing; a training case with that spacing does
    cases["ser-t"] = ("dev", (5.0, 5.0, 9.0), False)
    shards, folds = _study(tmp_path / "again", cases)
    assert plan_preprocessing(shards, folds)[0]["target_spacing_mm"] != plan["target_spacing_mm"]
    # config wins, one number or one per axis
    assert plan_preprocessing(shards, folds, 1.5)[0]["target_spacing_mm"] == [1.5] * 3
    configured = plan_preprocessing(shards, folds, [3, 1, 1])[0]
    assert configured["target_spacing_mm"] == [3, 1, 1]
    assert configured["target_spacing_from"] == "config preprocess.target_spacing_mm"


def test_the_plan_reads_back_and_rewrites_with_the_same_bytes(tmp_path):
    shards, folds = _study(tmp_path, {"ser-a": ("dev", (1.0, 1.0, 2.0), False)})
    plan, _ = plan_preprocessing(shards, folds)
    path = write_json(plan, tmp_path / "plan.json")
    first = path.read_bytes()
    assert read_plan(path) == plan
    write_json(plan_preprocessing(shards, folds)[0], path)
    assert path.read_bytes() == first


def test_thick_slices_are_planned_at_their_10th_percentile():
    """nnU-Net's anisotropy rule: 5 mm slices of 0.7 mm pixels, few slices: the slice
    axis takes the 10th percentile of its spacings, not the median."""
    slices = np.array([3.0, 4.0, 5.0, 5.0, 5.0, 6.0, 6.0])
    spacings = np.stack([slices, np.full(7, 0.7), np.full(7, 0.7)], 1)
    shapes = np.tile([40, 512, 512], (7, 1))
    spacing, rule = target_spacing(spacings, shapes)
    assert spacing == pytest.approx((np.percentile(slices, 10), 0.7, 0.7))
    assert "anisotropic axis 0" in rule
    # many slices (voxel counts not anisotropic): the median stays
    spacing, _ = target_spacing(spacings, np.tile([300, 512, 512], (7, 1)))
    assert spacing == pytest.approx((5.0, 0.7, 0.7))
    with pytest.raises(ValueError, match="no training case"):
        target_spacing(np.empty((0, 3)), np.empty((0, 3)))
