"""Patient-level, label-stratified split into a held-out test set and k folds.

The unit of splitting is the patient: all image units of a patient land in the same
split and fold, so no model is ever validated or tested on a patient it trained on
(several studies of one patient are far more alike than two patients are). Patients
are stratified by their patient-level label (positive if any of their units is), so
every fold and the test set keep the cohort's prevalence. Units without a label (-1, a
segmentation study with masks and no labels table) form one stratum of their own.

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
from radflow.tables import atomic_path, read_table


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
    if not set(assignment[C.LABEL]) <= {0, 1} or assignment[C.LABEL].nunique() < 2:
        # unlabelled units (-1: a segmentation study without a labels table) or a cohort
        # of one class are one stratum: every fold needs patients, not classes
        sizes = assignment[assignment[C.SPLIT] == C.SPLIT_DEV].groupby(C.FOLD)[C.PATIENT_PID]
        if sizes.nunique().reindex(range(n_folds), fill_value=0).min() < 1:
            raise ValueError(f"{assignment[C.PATIENT_PID].nunique()} patients are too few "
                             f"for {n_folds} folds; lower split.n_folds or add patients")  # fmt: skip
        return
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
    """Check that no patient is in two splits, write the split table atomically and log
    its composition (counts only)."""
    check_patient_level(assignment)
    path = Path(path)
    with atomic_path(path) as tmp:
        assignment.to_csv(tmp, sep="\t", index=False)
    summary = (
        assignment.assign(
            part=assignment[C.SPLIT]
            + assignment[C.FOLD].map(
                lambda f: " (train only)" if f == TRAIN_ONLY_FOLD else "" if f < 0 else f" fold {f}"
            )
        )
        .groupby("part")
        .agg(
            units=(C.SERIES_PID, "size"),
            patients=(C.PATIENT_PID, "nunique"),
            positive=(C.LABEL, "sum"),
        )
    )
    print(summary.to_string())


# ------------------------------------------------------------------ official splits
#: FOLD of a dev case that trains every fold model and validates none (an official
#: split's "train" part; its "val" part is fold 0).
TRAIN_ONLY_FOLD = -2
OFFICIAL_SPLIT_TABLE = "official_split.tsv"  # index: patient_pid, split, fold (results)
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "test": "test", "testing": "test"}  # fmt: skip


def read_official_split(path, *, patient_column: str, pseudonymise) -> pd.DataFrame:
    """The user's split table as (patient_pid, split, fold): split "train"/"val"/"test",
    fold the given fold ("" without a fold column). `pseudonymise(patient_id)` gives
    the study's patient pseudonym. Raises ValueError naming file, column and line (never
    an id) on a missing column, an unknown split, a bad fold or a patient listed twice
    with different assignments."""
    table = read_table(path)
    if patient_column not in table.columns:
        raise ValueError(f"{path}: no column {patient_column!r} (columns present: "
                         f"{', '.join(map(repr, table.columns))}); the split table names "
                         "patients as the images table / the DICOM patient_key does")  # fmt: skip
    has_split, has_fold = "split" in table.columns, "fold" in table.columns
    if not (has_split or has_fold):
        raise ValueError(f"{path}: needs a 'split' column (train/val/test) or a 'fold' column")
    rows: dict[str, tuple[str, str, int]] = {}
    for i, record in enumerate(table.to_dict("records")):
        line = i + 2
        patient = record[patient_column]
        if not patient:
            raise ValueError(f"{path}: empty {patient_column!r} at line {line}")
        split = record.get("split", "").lower()
        if has_split and split not in _SPLIT_NAMES and not (has_fold and not split):
            raise ValueError(f"{path}: line {line}: split must be train, val or test")
        split = _SPLIT_NAMES.get(split, "")
        fold = record.get("fold", "")
        if fold:
            if not fold.isdigit():
                raise ValueError(f"{path}: line {line}: fold must be a whole number >= 0 "
                                 "(empty for test patients)")  # fmt: skip
            if split == "test":
                raise ValueError(f"{path}: line {line}: a test patient has no fold")
        elif has_fold and split != "test":
            raise ValueError(f"{path}: line {line}: empty fold for a patient not in the test "
                             "split (give its fold, or split test)")  # fmt: skip
        pid = pseudonymise(patient)
        value = (split or ("dev" if fold else "test"), fold)
        if pid in rows and rows[pid][:2] != value:
            raise ValueError(f"{path}: lines {rows[pid][2]} and {line} assign one patient to "
                             "different splits; a patient belongs to one split")  # fmt: skip
        rows.setdefault(pid, (*value, line))
    out = pd.DataFrame(
        [(pid, split, fold) for pid, (split, fold, _) in rows.items()],
        columns=[C.PATIENT_PID, C.SPLIT, C.FOLD],
    )
    return out.sort_values(C.PATIENT_PID).reset_index(drop=True)


def official_fold_count(path) -> int:
    """Fold models an official split table gives: its folds, or 1 for train/val/test."""
    table = read_table(path)
    if "fold" in table.columns:
        folds = {int(f) for f in table["fold"] if f.isdigit()}
        if folds:
            return max(folds) + 1
    return 1


def apply_official_test_split(
    series: pd.DataFrame, official: pd.DataFrame, *, n_folds: int, seed: int
) -> pd.DataFrame:
    """An official split whose test part is kept and whose other patients (train, val or
    folds alike) are dealt into `n_folds` patient-level stratified folds, as
    `split_patients` deals them (config `split.table_folds: cross_validation`)."""
    _require_listed(series, official)
    test_patients = set(official.loc[official[C.SPLIT] == "test", C.PATIENT_PID])
    is_test = series[C.PATIENT_PID].isin(test_patients)
    dev = split_patients(series[~is_test], n_folds=n_folds, test_fraction=0.0, seed=seed)
    test = series.loc[is_test, [C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
    test[C.SPLIT], test[C.FOLD] = C.SPLIT_TEST, C.TEST_FOLD
    out = pd.concat([dev, test], ignore_index=True)
    out = out.sort_values(C.SERIES_PID).reset_index(drop=True)
    _check_folds(out, n_folds)
    return out


def _require_listed(series: pd.DataFrame, official: pd.DataFrame) -> None:
    missing = sorted(set(series[C.PATIENT_PID]) - set(official[C.PATIENT_PID]))
    if missing:
        raise ValueError(
            f"split.table lists no split for {len(missing)} of the study's "
            f"{series[C.PATIENT_PID].nunique()} patients (e.g. {missing[0]}); list every "
            "patient of the images table / DICOM tree in it"
        )


def apply_official_split(series: pd.DataFrame, official: pd.DataFrame) -> pd.DataFrame:
    """The split assignment (as `split_patients` returns it) that an official split
    table gives. train -> dev, fold TRAIN_ONLY_FOLD (trains every fold model); val ->
    dev, fold 0; a fold k -> dev, fold k; test -> test. Raises ValueError if a patient of
    the study is not in the table, if the folds are not 0..k-1, or if a validation fold
    or the test set holds a single class."""
    _require_listed(series, official)
    by_patient = official.set_index(C.PATIENT_PID)
    split_of, fold_of = {}, {}
    for pid in series[C.PATIENT_PID].unique():
        split, fold = by_patient.at[pid, C.SPLIT], by_patient.at[pid, C.FOLD]
        if split == "test":
            split_of[pid], fold_of[pid] = C.SPLIT_TEST, C.TEST_FOLD
        elif fold != "":
            split_of[pid], fold_of[pid] = C.SPLIT_DEV, int(fold)
        elif split == "val":
            split_of[pid], fold_of[pid] = C.SPLIT_DEV, 0
        else:
            split_of[pid], fold_of[pid] = C.SPLIT_DEV, TRAIN_ONLY_FOLD
    out = series[[C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
    out[C.SPLIT] = out[C.PATIENT_PID].map(split_of)
    out[C.FOLD] = out[C.PATIENT_PID].map(fold_of).astype(int)
    out = out.sort_values(C.SERIES_PID).reset_index(drop=True)
    folds = sorted({f for f in fold_of.values() if f >= 0})
    if folds != list(range(len(folds))) or not folds:
        raise ValueError(f"split.table: the validation folds present are {folds}; they must "
                         "be 0..k-1 (with a split column: some patients must be val)")  # fmt: skip
    _check_folds(out, len(folds))
    return out


def check_patient_level(assignment: pd.DataFrame) -> None:
    """Raise if any patient's units are in two splits or two folds (the split's promise,
    proved on the written table whichever way it was made)."""
    per_patient = assignment.groupby(C.PATIENT_PID)[[C.SPLIT, C.FOLD]].nunique()
    leaking = per_patient[(per_patient[C.SPLIT] > 1) | (per_patient[C.FOLD] > 1)]
    if len(leaking):
        raise ValueError(f"{len(leaking)} patients fall in two splits or folds "
                         f"(e.g. {leaking.index[0]}): the split is not patient-level")  # fmt: skip
