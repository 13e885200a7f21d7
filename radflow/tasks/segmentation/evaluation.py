"""The segmentation task's evaluate and figures stages: metrics of the written masks.

Everything is measured on the converted image's voxel grid (the native geometry), in
millimetres from the NIfTI header: each prediction (results/predict/fold<k>/<pid>.nii.gz)
against the converted mask (results/nifti/<shard>/<pid>_mask.nii.gz). Per case and
region (config segmentation.regions) `metrics.region_metrics` gives Dice, HD95, surface
Dice, volumes and lesion-wise detection; the conventions for empty masks are
`metrics`' (Metrics Reloaded).

Two sets are summarised, each as a mean per region and metric with a patient-level
percentile bootstrap 95% CI (`metrics.bootstrap_mean_ci`):

- out-of-fold: every development case, predicted by the fold model that validated on it
  (never trained on it): cross-validation's estimate;
- test (ensemble): every held-out test case, predicted by the ensemble of all fold models,
  a per-voxel majority vote of their label maps (`ensemble_vote`).

The per-fold predictions of the test cases are kept in per_case.tsv too (set
"fold-model test"), so the ensemble's gain over single models can be read off.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.tables import atomic_path, write_tsv
from radflow.tasks.segmentation import task as T
from radflow.tasks.segmentation.metrics import (
    SegmentationMetricSettings,
    bootstrap_mean_ci,
    region_metrics,
)

SET_FOLD_TEST = "fold-model test"
#: Separator of the fold predictions an ensemble row was voted from (column prediction).
ENSEMBLE_SEPARATOR = ";"


def read_label_map(path: str | os.PathLike):
    """(labels (i, j, k) integers, affine, spacing (mm per axis)) of a NIfTI label map."""
    import nibabel as nib

    image = nib.load(os.fspath(path))
    labels = np.asarray(image.dataobj)
    if labels.ndim != 3:
        raise ValueError(f"{path}: a label map must be 3D, this one has shape {labels.shape}")
    return (
        np.rint(labels).astype(np.int32),
        image.affine,
        tuple(float(z) for z in image.header.get_zooms()[:3]),
    )


def ensemble_vote(label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-voxel majority vote of label maps of one grid: the label most maps give; a tie
    goes to the lowest label value (background, 0, wins any tie it is in), so a voxel
    needs a strict plurality to become foreground."""
    maps = np.stack([np.asarray(m) for m in label_maps])
    values = np.unique(maps)
    counts = np.stack([(maps == v).sum(0) for v in values])  # values ascending
    return values[np.argmax(counts, axis=0)].astype(maps.dtype)


def _case_rows(prediction_labels, reference_path, settings, metric_settings):
    ref, ref_affine, spacing = read_label_map(reference_path)
    pred, pred_affine = prediction_labels
    if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=1e-3):
        raise ValueError(
            f"prediction and reference {reference_path} are not on one grid (shapes "
            f"{pred.shape} and {ref.shape}); rerun predict"
        )
    return [
        asdict(r)
        for r in region_metrics(pred, ref, spacing, settings.region_values(), metric_settings)
    ]


def per_case_metrics(predictions: pd.DataFrame, settings) -> pd.DataFrame:
    """One row per (case, prediction set, region): the case's columns, `set`, and every
    metric of `metrics.RegionMetrics`. Cases without a reference are left out."""
    metric_settings = SegmentationMetricSettings(
        nsd_tolerance_mm=settings.nsd_tolerance_mm,
        lesion_connectivity=settings.lesion_connectivity,
        min_lesion_mm3=settings.min_lesion_mm3,
    )
    table = predictions.copy()
    table[T.REFERENCE] = table[T.REFERENCE].fillna("").astype(str)
    table = table[table[T.REFERENCE] != ""]
    keep = [C.SERIES_PID, C.PATIENT_PID, C.LABEL, C.FOLD]
    rows = []
    for case in table.itertuples(index=False):
        case = case._asdict()
        pred, affine, _ = read_label_map(case[T.PREDICTION])
        kind = T.SET_OUT_OF_FOLD if case[C.SPLIT] == C.SPLIT_VAL else SET_FOLD_TEST
        for metrics in _case_rows((pred, affine), case[T.REFERENCE], settings, metric_settings):
            rows.append({**{k: case[k] for k in keep}, "set": kind, T.PREDICTION: case[T.PREDICTION],
                         T.REFERENCE: case[T.REFERENCE], T.IMAGE: case[T.IMAGE], **metrics})  # fmt: skip
    test = table[table[C.SPLIT] == C.SPLIT_TEST]
    for pid, group in test.groupby(C.SERIES_PID, sort=True):
        maps = [read_label_map(p) for p in group[T.PREDICTION]]
        voted = ensemble_vote([m[0] for m in maps])
        first = group.iloc[0]
        for metrics in _case_rows(
            (voted, maps[0][1]), first[T.REFERENCE], settings, metric_settings
        ):
            rows.append({C.SERIES_PID: pid, C.PATIENT_PID: first[C.PATIENT_PID],
                         C.LABEL: first[C.LABEL], C.FOLD: T.ENSEMBLE_FOLD, "set": T.SET_TEST,
                         T.PREDICTION: ENSEMBLE_SEPARATOR.join(group[T.PREDICTION]),
                         T.REFERENCE: first[T.REFERENCE], T.IMAGE: first[T.IMAGE], **metrics})  # fmt: skip
    return pd.DataFrame(rows)


def summarise(per_case: pd.DataFrame, *, n_boot: int, alpha: float, seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap CI (patients resampled) per set, region and metric."""
    rows = []
    for (kind, region), group in per_case.groupby(["set", "region"], sort=False):
        if kind == SET_FOLD_TEST:
            continue
        for metric in T.SUMMARY_METRICS:
            result = bootstrap_mean_ci(
                group[metric].to_numpy(float),
                groups=group[C.PATIENT_PID].to_numpy(),
                n_boot=n_boot,
                seed=seed,
                alpha=alpha,
            )
            rows.append({"set": kind, "region": region, "metric": metric, "mean": result.mean,
                         "ci_low": result.low, "ci_high": result.high, "n_cases": result.n_cases,
                         "n_undefined": result.n_undefined})  # fmt: skip
    return pd.DataFrame(rows)


def headline_set(per_case: pd.DataFrame) -> str:
    """The set the headline reports: the test ensemble where there is a test set."""
    return T.SET_TEST if (per_case["set"] == T.SET_TEST).any() else T.SET_OUT_OF_FOLD


def evaluate_segmentation(predictions: pd.DataFrame, settings, *, n_boot: int, alpha: float,
                          out_dir: Path) -> str:  # fmt: skip
    """Write per_case.tsv, metrics.tsv and metrics.json into `out_dir`; return the
    headline (the first region's mean Dice and HD95 with CIs)."""
    per_case = per_case_metrics(predictions, settings)
    if per_case.empty:
        raise ValueError("no predicted case has a reference mask: nothing to evaluate")
    summary = summarise(per_case, n_boot=n_boot, alpha=alpha)
    kind = headline_set(per_case)
    region = next(iter(settings.region_classes()))

    def stat(metric: str) -> dict:
        row = summary[(summary["set"] == kind) & (summary["region"] == region)
                      & (summary["metric"] == metric)].iloc[0]  # fmt: skip
        return {k: float(row[k]) for k in ("mean", "ci_low", "ci_high")} | {
            "n_cases": int(row["n_cases"])
        }

    dice, hd95 = stat("dice"), stat("hd95_mm")
    out_dir = Path(out_dir)
    write_tsv(per_case, out_dir / T.EVAL_PER_CASE)
    write_tsv(summary, out_dir / T.EVAL_SUMMARY)
    document = {
        "headline": {"set": kind, "region": region, "dice": dice, "hd95_mm": hd95},
        "alpha": alpha,
        "n_boot": n_boot,
        "regions": settings.region_classes(),
        "labels": dict(settings.labels),
        "summary": summary.to_dict("records"),
    }
    with atomic_path(out_dir / T.EVAL_JSON) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=2, allow_nan=True))
    level = round(100 * (1 - alpha))
    return (
        f"{kind}: {region} mean Dice {dice['mean']:.3f} ({level}% CI {dice['ci_low']:.3f}-"
        f"{dice['ci_high']:.3f}), HD95 {hd95['mean']:.1f} mm ({hd95['ci_low']:.1f}-"
        f"{hd95['ci_high']:.1f}) over {dice['n_cases']} cases"
    )


# ------------------------------------------------------------------ figures
def draw_segmentation_figures(evaluation_dir: Path, settings, out: Mapping[str, Path]) -> None:
    """The overlays of the headline set's best, median and worst case with a lesion (by
    the first region's Dice) and the metric strip plots, from the evaluation's tables."""
    import nibabel as nib

    from radflow.tables import read_tsv
    from radflow.tasks.segmentation import figures

    per_case = read_tsv(Path(evaluation_dir) / T.EVAL_PER_CASE)
    summary = read_tsv(Path(evaluation_dir) / T.EVAL_SUMMARY)
    kind = headline_set(per_case)
    region = next(iter(settings.region_classes()))
    shown = per_case[per_case["set"] == kind]
    # the overlays show lesions: cases whose reference has the region, where any has
    with_lesion = shown[(shown["region"] == region) & (shown["ref_volume_ml"] > 0)]
    pool = shown[shown[C.SERIES_PID].isin(with_lesion[C.SERIES_PID])] if len(with_lesion) else shown
    picks = figures.select_cases(pool, region=region, metric="dice")
    with tempfile.TemporaryDirectory() as scratch:
        cases = []
        for rank, pid in picks.items():
            row = shown[(shown[C.SERIES_PID] == pid) & (shown["region"] == region)].iloc[0]
            prediction = str(row[T.PREDICTION])
            if ENSEMBLE_SEPARATOR in prediction:  # the ensemble: vote again, for the figure
                maps = [read_label_map(p) for p in prediction.split(ENSEMBLE_SEPARATOR)]
                prediction = os.path.join(scratch, f"{pid}_ensemble.nii.gz")
                nib.save(nib.Nifti1Image(ensemble_vote([m[0] for m in maps]).astype(np.uint8),
                                         maps[0][1]), prediction)  # fmt: skip
            cases.append(figures.MontageCase(
                title=f"{rank}: {pid}, {region} Dice {row['dice']:.2f}",
                image=Path(row[T.IMAGE]), reference=Path(row[T.REFERENCE]),
                prediction=Path(prediction),
            ))  # fmt: skip
        figures.plot_overlay_montage(cases, out["overlays"], title=f"{kind}: {region}")
    figures.plot_metric_strips(shown, out["metric_strips"], summary=summary[summary["set"] == kind])
