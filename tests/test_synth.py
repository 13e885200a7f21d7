"""The demo cohort: real DICOM, deterministic, learnable from pixels only."""

import hashlib

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from radflow.metrics import roc_auc
from radflow.synth import phantom
from radflow.synth.cohort import POSITIVE

from synth_cohort import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_patients=60, seed=11)


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_writes_identical_files_whatever_the_worker_count(cohort, tmp_path):
    dicom, labels, lesions = make_cohort(tmp_path, n_patients=60, seed=11, threads=1)
    assert _digest(dicom) == _digest(cohort[0])
    assert labels.read_bytes() == cohort[1].read_bytes()
    assert lesions.read_bytes() == cohort[2].read_bytes()


def _images(dicom_dir):
    """Pixel arrays in MONOCHROME2 sense with rescale applied, per AccessionNumber."""
    out = {}
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float64)
        except Exception:
            continue
        pixels = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = -pixels
        out[str(ds.AccessionNumber)] = (ds, path, pixels)
    return out


def test_cohort_has_what_a_real_export_has(cohort):
    dicom, labels_path, lesions_path = cohort
    images = _images(dicom)
    labels = pd.read_csv(labels_path, dtype=str)
    lesions = pd.read_csv(lesions_path, dtype={"AccessionNumber": str})
    headers = [ds for ds, _, _ in images.values()]
    assert {ds.Modality for ds in headers} == {"DX", "CR"}
    assert {ds.PhotometricInterpretation for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert any("RescaleSlope" in ds for ds in headers)
    assert any(p.suffix == "" for _, p, _ in images.values())  # files without .dcm
    assert len({p.parent for _, p, _ in images.values()}) > 10  # nested random folders
    positives = set(labels.loc[labels["finding"] == POSITIVE, "AccessionNumber"])
    assert positives == set(lesions["AccessionNumber"])
    assert 0.3 < len(positives) / len(labels) < 0.7
    # one image was cut short on purpose and the export also holds a report and a text file
    all_files = [p for p in dicom.rglob("*") if p.is_file()]
    assert len(all_files) == len(images) + 3
    patients = pd.Series([str(ds.PatientID) for ds in headers])
    assert patients.duplicated().any()  # some patients have two studies


def test_recorded_lesion_centres_are_where_the_nodules_are_drawn():
    rng = np.random.default_rng(0)
    anatomy = phantom.sample_anatomy(rng)
    acq = phantom.Acquisition(
        rows=300,
        cols=260,
        pixel_spacing_mm=0.8,
        shift_u=0.03,
        shift_v=-0.02,
        rotation_deg=3,
        zoom=0.95,
        scatter=0.1,
        heel=0.05,
        noise=0.0,
        gain=500,
        offset=2000,
        bits_stored=12,
    )
    nodule = phantom.Nodule(u=-0.4, v=0.1, diameter_mm=20, contrast=0.6)
    with_nodule, marks = phantom.render(anatomy, acq, [nodule], np.random.default_rng(1))
    without, _ = phantom.render(anatomy, acq, [], np.random.default_rng(1))
    diff = with_nodule.astype(float) - without.astype(float)
    # the image is standardised as a whole, so compare against the median shift
    diff -= np.median(diff)
    row, col = np.unravel_index(np.argmax(diff), diff.shape)
    ((r0, c0, d_mm),) = marks
    assert np.hypot(row - r0, col - c0) < 2.0
    rr, cc = np.mgrid[: acq.rows, : acq.cols]
    inside = np.hypot(rr - r0, cc - c0) < 0.8 * d_mm / 2 / acq.pixel_spacing_mm
    outside = np.hypot(rr - r0, cc - c0) > 1.5 * d_mm / 2 / acq.pixel_spacing_mm
    assert diff[inside].min() > 5 * np.abs(diff[outside]).max()


def _metadata_features(ds, path, pixels):
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    pct = np.percentile(pixels, [1, 5, 25, 50, 75, 95, 99])
    return [
        ds.Rows,
        ds.Columns,
        float(spacing[0]),
        ds.BitsStored,
        ds.PhotometricInterpretation == "MONOCHROME1",
        float(ds.get("RescaleSlope", 1)),
        float(ds.get("RescaleIntercept", 0)),
        ds.Modality == "DX",
        ds.ViewPosition == "PA",
        float(ds.KVP),
        float(ds.Exposure),
        float(ds.WindowCenter),
        float(ds.WindowWidth),
        path.stat().st_size,
        len(path.name),
        len(path.parts),
        path.suffix == ".dcm",
        pixels.mean(),
        pixels.std(),
        *pct,
        (pct[-1] - pct[0]) / (pixels.std() + 1e-9),
    ]


def _cv_auroc(features, labels):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")[:, 1]
    return roc_auc(labels, scores)


def test_label_is_not_recoverable_from_metadata_or_global_intensities(cohort):
    dicom, labels_path, _ = cohort
    labels = pd.read_csv(labels_path, dtype=str).set_index("AccessionNumber")["finding"]
    images = _images(dicom)
    keys = sorted(images)
    features = np.array([_metadata_features(*images[k]) for k in keys], dtype=float)
    y = np.array([int(labels[k] == POSITIVE) for k in keys])
    assert _cv_auroc(features, y) < 0.7
    # the probe has power: a feature that does carry the label is found at once
    leaky = np.column_stack([features, y + np.random.default_rng(0).normal(0, 0.3, len(y))])
    assert _cv_auroc(leaky, y) > 0.9
