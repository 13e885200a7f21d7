"""The plan of the volumes layout (nnU-Net's fingerprint and plan), decided once per study.

Fingerprint: for every training case (the split table's rows outside the held-out test
set), its voxel spacing and shape on the closest canonical axes (z, y, x), read from the
converted NIfTI headers only (no voxels). Plan: the decisions the per-shard preprocessing
applies to every case:

- target spacing (mm, per axis z, y, x): config `preprocess.target_spacing_mm` when
  given (one number: isotropic, or one per axis); otherwise the per-axis median of the
  training cases' spacings, with nnU-Net's anisotropy rule: where the coarsest median axis
  is more than ANISOTROPY_RATIO times coarser than the others and has fewer than
  1/ANISOTROPY_RATIO of their voxels, that axis takes the 10th percentile of its spacings
  instead (no smaller than the other axes'), so thick-slice scans are not interpolated
  into many invented slices. Test cases never enter: their spacing must not steer
  preprocessing;
- the channel count of the study's cases (the most common among training cases).

Two files: `plan.json` holds the decisions only, so that adding a case whose spacing
leaves them unchanged rewrites it with the same bytes (Snakemake compares checksums and
re-preprocesses nothing); `fingerprint.json` holds what they were decided from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.geometry import canonical_shape, canonical_spacing_mm, read_nifti_geometry
from radflow.tables import read_tsv, write_bytes_atomic

#: nnU-Net's anisotropy threshold: an axis this many times coarser than the others (and
#: with this many times fewer voxels) is planned at its 10th-percentile spacing.
ANISOTROPY_RATIO = 3.0
LOW_RESOLUTION_PERCENTILE = 10
#: The preprocessed arrays' axes, in order (closest canonical RAS axes, reversed).
AXES = ("inferior-superior", "posterior-anterior", "left-right")


def training_cases(folds: pd.DataFrame) -> list[str]:
    """Series pseudonyms of the split table's training cases (every row not held out as
    test), sorted."""
    return sorted(folds.loc[folds[C.SPLIT] != C.SPLIT_TEST, C.SERIES_PID])


def case_fingerprint(nifti_dirs: Sequence[str | os.PathLike], series_pids) -> pd.DataFrame:
    """series_pid, n_channels, modality, spacing_mm (z, y, x) and shape (z, y, x) on the
    closest canonical axes of each wanted 3D unit converted ok (headers and sidecars only)."""
    wanted, rows = set(series_pids), []
    for nifti_dir in map(Path, nifti_dirs):
        converted = read_tsv(nifti_dir / C.MANIFEST, text=True)
        ok = converted[(converted[C.STATUS] == C.STATUS_OK) & (converted["ndim"] == "3")]
        for pid in ok[C.SERIES_PID]:
            if pid not in wanted:
                continue
            sidecar = json.loads((nifti_dir / f"{pid}{C.SIDECAR_SUFFIX}").read_text())
            shape, affine = read_nifti_geometry(nifti_dir / f"{pid}{C.NIFTI_SUFFIX}")
            rows.append({C.SERIES_PID: pid, "n_channels": int(sidecar.get("n_channels", 1)),
                         C.MODALITY: str(sidecar.get("Modality", "")),
                         "spacing_mm": [round(v, 6) for v in canonical_spacing_mm(affine)],
                         "shape": list(canonical_shape(shape, affine))})  # fmt: skip
    columns = [C.SERIES_PID, "n_channels", C.MODALITY, "spacing_mm", "shape"]
    return pd.DataFrame(rows, columns=columns).sort_values(C.SERIES_PID, ignore_index=True)


def target_spacing(
    spacings_mm: np.ndarray, shapes: np.ndarray, configured: float | Sequence[float] | None = None
) -> tuple[tuple[float, float, float], str]:
    """(target spacing (z, y, x) in mm, how it was decided) from the training cases'
    spacings (N, 3) and shapes (N, 3), or the configured value (module docstring)."""
    if configured is not None:
        values = [configured] * 3 if np.isscalar(configured) else list(configured)
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"preprocess.target_spacing_mm {configured!r}: give one positive "
                             "number or three (z, y, x)")  # fmt: skip
        return tuple(float(v) for v in values), "config preprocess.target_spacing_mm"
    spacings_mm, shapes = np.asarray(spacings_mm, float), np.asarray(shapes, float)
    if not len(spacings_mm):
        raise ValueError("no training case to plan from: the split has no 3D unit converted "
                         "ok outside the test set")  # fmt: skip
    target = np.median(spacings_mm, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    rule = "median of the training cases' spacings"
    if (target[coarse] > ANISOTROPY_RATIO * target[others].max()
            and median_shape[coarse] * ANISOTROPY_RATIO < median_shape[others].min()):  # fmt: skip
        low = np.percentile(spacings_mm[:, coarse], LOW_RESOLUTION_PERCENTILE)
        target[coarse] = max(low, target[others].max())
        rule += (f"; anisotropic axis {coarse} ({AXES[coarse]}): their "
                 f"{LOW_RESOLUTION_PERCENTILE}th percentile")  # fmt: skip
    return tuple(float(v) for v in target), rule


def plan_preprocessing(
    nifti_dirs: Sequence[str | os.PathLike],
    folds_path: str | os.PathLike,
    configured_spacing: float | Sequence[float] | None = None,
) -> tuple[dict, dict]:
    """(plan, fingerprint) of a study: see the module docstring. Inputs: the convert
    stage's shard folders, the split table and config `preprocess.target_spacing_mm`."""
    folds = read_tsv(folds_path)
    training = training_cases(folds)
    cases = case_fingerprint(nifti_dirs, training)
    counts = cases["n_channels"].value_counts()
    n_channels = int(counts[counts == counts.max()].index.min()) if len(cases) else 1
    spacings = np.array(cases["spacing_mm"].tolist(), float).reshape(-1, 3)
    shapes = np.array(cases["shape"].tolist(), float).reshape(-1, 3)
    spacing, rule = target_spacing(spacings, shapes, configured_spacing)
    plan = {
        "layout": C.LAYOUT_VOLUMES,
        "axes": list(AXES),
        "target_spacing_mm": [round(v, 6) for v in spacing],
        "target_spacing_from": rule,
        "n_channels": n_channels,
    }

    def stat(values, fn, *args):
        return [round(float(v), 6) for v in fn(values, *args, axis=0)] if len(values) else None

    resampled = shapes * spacings / np.asarray(spacing) if len(cases) else shapes
    fingerprint = {
        "training_cases": len(cases),
        "split_training_rows": len(training),
        "test_rows_left_out": int((folds[C.SPLIT] == C.SPLIT_TEST).sum()),
        "modalities": {str(k): int(v) for k, v in cases[C.MODALITY].value_counts().items()},
        "n_channels": {str(k): int(v) for k, v in counts.sort_index().items()},
        "median_spacing_mm": stat(spacings, np.median),
        "spacing_percentile_10_mm": stat(spacings, np.percentile, 10),
        "spacing_percentile_90_mm": stat(spacings, np.percentile, 90),
        "median_shape_vox": stat(shapes, np.median),
        "median_shape_at_target_spacing_vox": stat(resampled, np.median),
        "cases": cases.to_dict("records"),
    }
    return plan, fingerprint


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON, atomically."""
    return write_bytes_atomic(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def read_plan(path: str | os.PathLike) -> dict:
    """A plan.json as `plan_preprocessing` wrote it."""
    plan = json.loads(Path(path).read_text())
    if plan.get("layout") != C.LAYOUT_VOLUMES:
        raise ValueError(f"{path}: not a plan of the volumes layout")
    return plan
