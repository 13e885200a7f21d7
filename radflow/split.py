"""Patient-level, label-stratified split into a held-out test set and k folds.

The unit of splitting is the patient: all image units of a patient land in the same
split and fold, so no model is ever validated or tested on a patient it trained on
(several studies of one patient are far more alike than two patients are). Patients
are stratified by their patient-level label (positive if any of their units is), so
every fold and the test set keep the cohort's prevalence.

Determinism: patients are sorted by pseudonym and then permuted by a seeded generator,
so the split depends only on (set of patients, labels, seed, n_folds, test_fraction),
not on file order or the number of workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.tables import atomic_path


def split_patients(
    series: pd.DataFrame, *, n_folds: int = 5, test_fraction: float = 0.2, seed: int = 0
) -> pd.DataFrame:
    """Assign every image unit to `test` or to a validation fold of the `dev` pool.

    Input: the index's series table (series_pid, patient_pid, label). Output: one row per
    unit with series_pid, patient_pid, label, split ("dev"/"test") and fold (0..k-1 for
    dev, -1 for test), sorted by series_pid.
    """
    if n_folds < 2:
        raise ValueError(f"split.n_folds must be at least 2, got {n_folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"split.test_fraction must be in [0, 1), got {test_fraction}")
    missing = {C.SERIES_PID, C.PATIENT_PID, C.LABEL} - set(series.columns)
    if missing:
        raise ValueError(f"series table lacks column(s) {sorted(missing)}")

    patient_label = series.groupby(C.PATIENT_PID)[C.LABEL].max().sort_index()
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    fold_of: dict[str, int] = {}
    for label in sorted(patient_label.unique()):
        patients = patient_label.index[patient_label == label].to_numpy()
        patients = patients[rng.permutation(len(patients))]
        n_test = int(round(test_fraction * len(patients)))
        for pid in patients[:n_test]:
            split_of[pid], fold_of[pid] = C.SPLIT_TEST, C.TEST_FOLD
        # deal the rest round-robin, starting where the previous stratum stopped, so fold
        # sizes differ by at most one patient overall
        offset = sum(1 for f in fold_of.values() if f != C.TEST_FOLD)
        for i, pid in enumerate(patients[n_test:]):
            split_of[pid], fold_of[pid] = C.SPLIT_DEV, (offset + i) % n_folds

    out = series[[C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
    out[C.SPLIT] = out[C.PATIENT_PID].map(split_of)
    out[C.FOLD] = out[C.PATIENT_PID].map(fold_of).astype(int)
    out = out.sort_values(C.SERIES_PID).reset_index(drop=True)
    _check_folds(out, n_folds)
    return out


def _check_folds(assignment: pd.DataFrame, n_folds: int) -> None:
    dev = assignment[assignment[C.SPLIT] == C.SPLIT_DEV]
    for fold in range(n_folds):
        labels = set(dev.loc[dev[C.FOLD] == fold, C.LABEL])
        if labels != {0, 1}:
            raise ValueError(
                f"validation fold {fold} would hold only label(s) {sorted(labels)}: "
                f"{dev[C.PATIENT_PID].nunique()} dev patients are too few for "
                f"{n_folds} folds; lower split.n_folds or add patients"
            )
    test = assignment[assignment[C.SPLIT] == C.SPLIT_TEST]
    if len(test) and set(test[C.LABEL]) != {0, 1}:
        raise ValueError(
            "the test set would hold a single class; raise split.test_fraction or add patients"
        )


def fold_members(
    assignment: pd.DataFrame, fold: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, validation, test) rows for fold model `fold`."""
    dev = assignment[C.SPLIT] == C.SPLIT_DEV
    val = dev & (assignment[C.FOLD] == fold)
    return assignment[dev & ~val], assignment[val], assignment[assignment[C.SPLIT] == C.SPLIT_TEST]


def write_split(assignment: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the split table atomically and log its composition (counts only)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        assignment.to_csv(tmp, sep="\t", index=False)
    summary = (
        assignment.assign(
            part=assignment[C.SPLIT]
            + assignment[C.FOLD].map(lambda f: "" if f < 0 else f" fold {f}")
        )
        .groupby("part")
        .agg(
            units=(C.SERIES_PID, "size"),
            patients=(C.PATIENT_PID, "nunique"),
            positive=(C.LABEL, "sum"),
        )
    )
    print(summary.to_string())
