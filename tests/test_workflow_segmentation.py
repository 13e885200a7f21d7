"""The segmentation study end to end in the real Snakemake DAG, on a tiny synthetic brain
MR cohort (config/examples/brain_mri_segmentation.yaml, shrunk): DICOM with fake PHI and
masks as NIfTI and DICOM SEG in; a residual U-Net trained a few steps; masks out as
NIfTI on the converted grids and as DICOM SEG over the source series; per-region
metrics with CIs; figures. A second run does nothing; no planted identifier reaches
results/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from radflow import conventions as C
from radflow.tables import read_tsv
from radflow.tasks.segmentation.dicom_seg import labels_on_source_frames, reference_files

from synth_cohort import planted_phi, run_example, text_of

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow
EXAMPLE = REPO / "config" / "examples" / "brain_mri_segmentation.yaml"
TINY = {
    # no labels table: masks only (labels -1, one stratum in the split)
    "data": {"labels_table": None},
    "synthesize": {"n_patients": 10, "brain": {"scale": 4.0}},
    # batches of 2 patches and windows overlapping by 0.1 (the example: 4 and 0.5, eight
    # times the windows in 3D): the checks below need masks on every case's grid, not
    # a good model
    "train": {"epochs": 1, "batch_size": 2},
    "segmentation": {"iterations_per_epoch": 2, "validation_patches": 1, "overlap": 0.1},
    "evaluate": {"n_boot": 200},
}
SEGMENTS = {1: "necrosis", 2: "oedema", 4: "enhancing"}


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_example(EXAMPLE, workdir, *args)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("segmentation")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = _snakemake(workdir)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def _predictions(study: Path):
    return [row for fold in (0, 1) for row in read_tsv(study / f"results/predict/fold{fold}.tsv")
            .to_dict("records")]  # fmt: skip


def test_study_writes_metrics_masks_and_figures(study):
    per_case = read_tsv(study / "results/evaluate/per_case.tsv")
    assert set(per_case["region"]) == {"whole", "core", "enhancing"}
    assert {"out-of-fold", "test (ensemble)", "fold-model test"} <= set(per_case["set"])
    summary = read_tsv(study / "results/evaluate/metrics.tsv")
    dice = summary[(summary["metric"] == "dice") & (summary["region"] == "whole")]
    assert ((dice["ci_low"] <= dice["mean"]) & (dice["mean"] <= dice["ci_high"])).all()
    for name in ("segmentation_overlays.png", "segmentation_metrics.png", "training_curves.png"):
        assert (study / "results/figures" / name).stat().st_size > 10_000
    # every predicted mask overlays its converted image exactly: same grid, same affine
    rows = _predictions(study)
    assert len(rows) >= 10
    for row in rows:
        mask, image = nib.load(study / row["prediction"]), nib.load(study / row["image"])
        assert mask.shape == image.shape[:3]
        np.testing.assert_array_equal(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, *SEGMENTS}


def test_dicom_seg_of_each_prediction_overlays_its_source_series(study):
    shard_tables = sorted((study / "private" / C.SHARD_INDEX_DIR).glob("*.tsv"))
    sources = reference_files(shard_tables, str(study / "data/demo-seg/dicom"))
    checked = 0
    for row in _predictions(study):
        seg_path = study / "private/predict" / f"fold{row[C.FOLD]}" / f"{row[C.SERIES_PID]}.dcm"
        seg = hd.seg.segread(seg_path)
        series = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources[row[C.SERIES_PID]]]
        uids = [str(ds.SOPInstanceUID) for ds in series]
        assert str(seg.PatientID) == row[C.PATIENT_PID]
        assert seg.StudyInstanceUID == series[0].StudyInstanceUID
        assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
        referenced = {str(item.ReferencedSOPInstanceUID)
                      for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence}  # fmt: skip
        assert referenced <= set(uids)
        # the SEG, matched to the series by highdicom, holds the NIfTI mask's labels
        mask = nib.load(study / row["prediction"])
        expected = labels_on_source_frames(np.asarray(mask.dataobj), mask.affine, series)
        numbers = sorted(seg.SegmentSequence, key=lambda s: int(s.SegmentNumber))
        value_of = {name: value for value, name in SEGMENTS.items()}
        lookup = np.array([0, *[value_of[s.SegmentLabel] for s in numbers]])
        read_back = lookup[seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                                              relabel=False)]  # fmt: skip
        np.testing.assert_array_equal(read_back, expected)
        checked += expected.any()
    assert checked >= 1  # at least one SEG with a predicted voxel was compared


def test_second_run_does_nothing(study):
    run = _snakemake(study, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def _planned(study: Path, change: dict) -> set[str]:
    """The rules a dry run plans after `change` is layered over the study's config."""
    (study / "change.yaml").write_text(yaml.safe_dump(change))
    run = _snakemake(study, "-n", "--configfile", str(REPO / "config" / "config.yaml"),
                     str(EXAMPLE), str(study / "tiny.yaml"), str(study / "change.yaml"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    return {line.split()[1].rstrip(":") for line in text.splitlines()
            if line.startswith(("rule ", "localrule "))}  # fmt: skip


def test_a_metric_option_reruns_the_evaluation_only(study):
    planned = _planned(study, {"segmentation": {"nsd_tolerance_mm": 3.0}})
    assert planned and planned <= {"evaluate", "figures", "all"}, planned


def test_an_inference_option_repredicts_without_retraining(study):
    planned = _planned(study, {"segmentation": {"overlap": 0.25}})
    assert "predict" in planned and "train" not in planned, planned


def test_no_planted_phi_in_results_and_none_but_uids_in_the_seg(study):
    phi = planted_phi(study / "data/demo-seg/dicom")
    assert len(phi) > 30
    files = [p for p in (study / "results").rglob("*") if p.is_file()]
    assert any(p.name.endswith(C.NIFTI_SUFFIX) and "predict" in p.parts for p in files)
    leaks = []
    for path in files:
        blob, rel = text_of(path), str(path.relative_to(study))  # each file read once
        leaks += [f"{rel}: {v}" for v in phi if v.encode() in blob or v in rel]
    assert not leaks, "PHI found in results:\n" + "\n".join(leaks[:20])
    # the SEGs (private: they reference the source's UIDs) carry no other identifier
    uids = {v for v in phi if v.replace(".", "").isdigit()}
    for seg in (study / "private/predict").rglob("*.dcm"):
        blob = seg.read_bytes()
        found = [v for v in phi - uids if v.encode() in blob]
        assert not found, f"{seg.name}: {found}"
