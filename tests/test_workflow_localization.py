"""The localisation study end to end in the real Snakemake DAG, on a tiny synthetic chest
CT cohort (config/examples/lung_ct_localization.yaml, shrunk): DICOM in HU with fake PHI,
head-first, feet-first and oblique series, nodules annotated in world mm as LUNA16 does;
a residual U-Net trained a few steps as a centre detector; candidates in LUNA16's
submission form under results/ with series pseudonyms; FROC and CPM with CIs; figures.
A second run does nothing; no planted identifier reaches results/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from radflow import conventions as C
from radflow.data import VolumeStore
from radflow.luna16 import read_annotations, read_candidates, read_seriesuids, score
from radflow.tables import read_tsv

from synth_cohort import planted_phi, run_example, text_of

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow
EXAMPLE = REPO / "config" / "examples" / "lung_ct_localization.yaml"
TINY = {
    "synthesize": {"n_patients": 8, "lung": {"scale": 4.0, "slab_mm": 96}},
    "preprocess": {"target_spacing_mm": 4.0},
    "train": {"epochs": 1, "batch_size": 2},
    "localization": {"patch_size": [16, 32, 32], "iterations_per_epoch": 2,
                     "validation_patches": 1},
    "evaluate": {"n_boot": 100},
}  # fmt: skip


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_example(EXAMPLE, workdir, *args)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("localization")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = _snakemake(workdir)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def test_candidates_in_luna16_form_and_froc_recomputes_from_them(study):
    folds = sorted((study / "results/predict").glob("fold*/candidates.csv"))
    assert len(folds) == 2
    series = set(read_tsv(study / "results/index/series.tsv")[C.SERIES_PID])
    for path in folds:
        header = path.read_text().splitlines()[0]
        assert header == "seriesuid,coordX,coordY,coordZ,probability"
        assert set(read_candidates(path)["seriesuid"]) <= series  # pseudonyms, no UIDs
    # the evaluation's numbers are LUNA16's score of the files it wrote
    froc = read_tsv(study / "results/evaluate/froc.tsv")
    oof = froc[froc["set"] == "out-of-fold"].set_index("fp_per_scan")
    predictions = pd.concat([read_tsv(study / f"results/predict/fold{k}.tsv") for k in (0, 1)])
    val = predictions[predictions[C.SPLIT] == "val"]
    scans = sorted(val[C.SERIES_PID])
    candidates = pd.concat([
        read_candidates(study / f"results/predict/fold{k}/candidates.csv")
        .query("seriesuid in @pids", local_dict={"pids": list(rows[C.SERIES_PID])})
        for k, rows in val.groupby(C.FOLD)])  # fmt: skip
    truth = [read_annotations(study / f"results/predict/fold{k}/{n}") for k in (0, 1)
             for n in ("annotations.csv",)]  # fmt: skip
    excluded = [read_annotations(study / f"results/predict/fold{k}/annotations_excluded.csv")
                for k in (0, 1)]  # fmt: skip
    again = score(pd.concat(truth).drop_duplicates(), pd.concat(excluded).drop_duplicates(),
                  scans, candidates, n_boot=10)  # fmt: skip
    assert float(oof.loc["CPM", "sensitivity"]) == pytest.approx(again.cpm, abs=1e-9)
    assert set(read_seriesuids(study / "results/predict/fold0/seriesuids.csv")) <= series
    for name in ("localization_froc.png", "localization_crops.png", "training_curves.png"):
        assert (study / "results/figures" / name).stat().st_size > 10_000


def test_annotations_reach_nodule_voxels_through_convert_and_preprocess(study):
    """World mm (LPS, from the DICOM geometry of head-first, feet-first and oblique
    series) -> converted NIfTI -> preprocessed voxels: each nodule's centre voxel is
    brighter than aerated lung (window [-1000, 400] HU -> [0, 1]: lung < 0.25)."""
    store = VolumeStore(sorted((study / "results/preprocessed").glob("shard-*")))
    checked = []
    for pid in store.cases:
        image = store.image(pid)[0]
        for lesion in store.lesions(pid).to_dict("records"):
            if lesion["excluded"] or lesion[C.DIAMETER_MM] < 12:  # 4 mm voxels: large ones
                continue
            z, y, x = (int(round(v)) for v in (lesion["z"], lesion["y"], lesion["x"]))
            if not all(0 <= v < s for v, s in zip((z, y, x), image.shape, strict=True)):
                continue
            checked.append(float(image[z, y, x]))
    assert len(checked) >= 2
    assert np.median(checked) > 0.55, checked  # soft tissue (~0 HU -> 0.71)


def test_second_run_does_nothing(study):
    run = _snakemake(study, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_no_planted_phi_or_uid_in_results(study):
    phi = planted_phi(study / "data/demo-lung/dicom")
    assert len(phi) > 20
    uids = set(read_annotations(study / "data/demo-lung/annotations.csv")["seriesuid"])
    assert len(uids) >= 3
    files = [p for p in (study / "results").rglob("*") if p.is_file()]
    assert any(p.name == "candidates.csv" for p in files)
    leaks = []
    for path in files:
        blob, rel = text_of(path), str(path.relative_to(study))
        leaks += [f"{rel}: {v}" for v in phi | uids if v.encode() in blob or v in rel]
    assert not leaks, "PHI found in results:\n" + "\n".join(leaks[:20])


LIDC = REPO.parent / "shared" / "data" / "lidc"


@pytest.mark.skipif(not LIDC.is_dir(), reason="../shared/data/lidc is absent")
def test_trained_models_apply_to_real_lidc_slabs_in_world_mm(study, tmp_path):
    """The study's fold models on the real LIDC-IDRI slabs (DICOM outside the study):
    candidates in world mm (LPS) inside each slab's extent, keyed by its real
    SeriesInstanceUID, and scored by radflow.luna16 against LUNA16's annotations."""
    import pydicom

    from radflow.luna16 import read_annotations as read_luna
    from radflow.tasks.localization.apply import main

    config = tmp_path / "apply.yaml"
    # an untrained-looking 2-step model: a low threshold so that candidates exist
    config.write_text(yaml.safe_dump({**TINY, "localization": {**TINY["localization"],
                                                              "threshold": 1e-4}}))  # fmt: skip
    assert main([str(study), str(LIDC), str(tmp_path / "out"), "--config", str(config)]) == 0
    candidates = read_candidates(tmp_path / "out" / "candidates.csv")
    extent = {}
    for path in LIDC.rglob("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the XML files
            continue
        corners = [np.asarray(ds.ImagePositionPatient, float)]
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(
            ds.ImageOrientationPatient[3:], float)  # fmt: skip
        spacing = np.asarray(ds.PixelSpacing, float)
        corners.append(corners[0] + row * spacing[1] * (ds.Columns - 1)
                       + col * spacing[0] * (ds.Rows - 1))  # fmt: skip
        lo, hi = extent.get(ds.SeriesInstanceUID, (np.full(3, np.inf), np.full(3, -np.inf)))
        extent[ds.SeriesInstanceUID] = (np.minimum(lo, np.min(corners, 0)),
                                        np.maximum(hi, np.max(corners, 0)))  # fmt: skip
    assert set(candidates["seriesuid"]) <= set(extent) and len(candidates)
    for record in candidates.to_dict("records"):
        lo, hi = extent[record["seriesuid"]]
        world = np.array([record["coordX"], record["coordY"], record["coordZ"]])
        assert np.all(world >= lo - 3.0) and np.all(world <= hi + 3.0), (world, lo, hi)
    luna = REPO.parent / "shared" / "data" / "luna16"
    result = score(read_luna(luna / "annotations.csv"), read_luna(luna / "annotations_excluded.csv"),
                   read_seriesuids(tmp_path / "out" / "seriesuids.csv"), candidates, n_boot=10)  # fmt: skip
    assert result.n_scans == 3 and result.n_nodules == 4  # LUNA16's nodules of the 3 scans
