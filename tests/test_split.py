import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.split import fold_members, split_patients, write_split


def _cohort(n_patients=60, seed=0, second_study=0.4, prevalence=0.4):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < prevalence)
        for s in range(1 + int(rng.random() < second_study)):
            rows.append(
                {
                    C.SERIES_PID: f"ser-{p:03d}-{s}",
                    C.PATIENT_PID: f"pat-{p:03d}",
                    C.LABEL: label if s == 0 else int(rng.random() < 0.5),
                }
            )
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits():
    assignment = split_patients(_cohort(), n_folds=5, test_fraction=0.2, seed=3)
    parts = assignment.groupby(C.PATIENT_PID).apply(
        lambda g: set(zip(g[C.SPLIT], g[C.FOLD], strict=True)), include_groups=False
    )
    assert all(len(p) == 1 for p in parts), "a patient's units were spread over splits/folds"
    for fold in range(5):
        train, val, test = fold_members(assignment, fold)
        assert not set(train[C.PATIENT_PID]) & set(val[C.PATIENT_PID])
        assert not set(train[C.PATIENT_PID]) & set(test[C.PATIENT_PID])
        assert not set(val[C.PATIENT_PID]) & set(test[C.PATIENT_PID])
        assert len(train) + len(val) + len(test) == len(assignment)


def test_split_is_stratified_and_balanced():
    cohort = _cohort(n_patients=200, seed=1)
    assignment = split_patients(cohort, n_folds=5, test_fraction=0.2, seed=0)
    patient_label = cohort.groupby(C.PATIENT_PID)[C.LABEL].max()
    test_patients = assignment.loc[assignment[C.SPLIT] == C.SPLIT_TEST, C.PATIENT_PID].unique()
    assert len(test_patients) == pytest.approx(0.2 * 200, abs=1)
    overall = patient_label.mean()
    assert patient_label[test_patients].mean() == pytest.approx(overall, abs=0.02)
    dev = assignment[assignment[C.SPLIT] == C.SPLIT_DEV]
    sizes = dev.groupby(C.FOLD)[C.PATIENT_PID].nunique()
    assert sizes.max() - sizes.min() <= 1
    for _fold, group in dev.groupby(C.FOLD):
        assert patient_label[group[C.PATIENT_PID].unique()].mean() == pytest.approx(
            overall, abs=0.05
        )


def test_split_is_deterministic_and_seeded():
    cohort = _cohort()
    a = split_patients(cohort, seed=7)
    b = split_patients(cohort.sample(frac=1, random_state=1), seed=7)  # row order irrelevant
    pd.testing.assert_frame_equal(a, b)
    c = split_patients(cohort, seed=8)
    assert not a[C.FOLD].equals(c[C.FOLD])


def test_too_few_patients_for_folds_is_an_error_naming_the_key():
    cohort = _cohort(n_patients=6)
    with pytest.raises(ValueError, match="split.n_folds"):
        split_patients(cohort, n_folds=5, test_fraction=0.2, seed=0)


# ------------------------------------------------------------ official split tables
def _series(n_patients=12, per_patient=2):
    rows = []
    for p in range(n_patients):
        for u in range(per_patient):
            rows.append({C.SERIES_PID: f"ser-{p:02d}{u}", C.PATIENT_PID: f"pat-{p:02d}",
                         C.LABEL: p % 2})  # fmt: skip
    return pd.DataFrame(rows)


def _official(tmp_path, rows, columns):
    path = tmp_path / "split.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def test_official_train_val_test_split(tmp_path):
    from radflow.split import (TRAIN_ONLY_FOLD, apply_official_split, fold_members,  # noqa: I001
                               official_fold_count, read_official_split)  # fmt: skip

    names = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    path = _official(tmp_path, [(f"P{p:02d}", names[p]) for p in range(12)],
                     ["patient_id", "split"])  # fmt: skip
    official = read_official_split(path, patient_column="patient_id",
                                   pseudonymise=lambda p: "pat-" + p[1:])  # fmt: skip
    assignment = apply_official_split(_series(), official)
    assert official_fold_count(path) == 1
    by_patient = assignment.groupby(C.PATIENT_PID).first()
    for p in range(12):
        row = by_patient.loc[f"pat-{p:02d}"]
        expected = {"train": (C.SPLIT_DEV, TRAIN_ONLY_FOLD), "val": (C.SPLIT_DEV, 0),
                    "test": (C.SPLIT_TEST, C.TEST_FOLD)}[names[p]]  # fmt: skip
        assert (row[C.SPLIT], row[C.FOLD]) == expected
    train, val, test = fold_members(assignment, 0)
    assert len(train) == 12 and len(val) == 4 and len(test) == 8
    write_split(assignment, tmp_path / "folds.tsv")  # proves patient-level on write


def test_official_folds_and_errors(tmp_path):
    from radflow.split import apply_official_split, official_fold_count, read_official_split

    pseud = lambda p: "pat-" + p[1:]  # noqa: E731
    rows = [(f"P{p:02d}", "" if p >= 8 else str(p // 2 % 2), "test" if p >= 8 else "")
            for p in range(12)]  # fmt: skip
    path = _official(tmp_path, rows, ["patient_id", "fold", "split"])
    assert official_fold_count(path) == 2
    assignment = apply_official_split(
        _series(), read_official_split(path, patient_column="patient_id", pseudonymise=pseud)
    )
    assert sorted(assignment[C.FOLD].unique()) == [C.TEST_FOLD, 0, 1]
    # a patient of the study missing from the table
    short = _official(tmp_path, rows[:-1], ["patient_id", "fold", "split"])
    with pytest.raises(ValueError, match="lists no split for 1 of the study's 12 patients"):
        apply_official_split(
            _series(), read_official_split(short, patient_column="patient_id", pseudonymise=pseud)
        )
    # errors name the file and line, never the id
    bad = _official(tmp_path, [("P00", "training"), ("P01", "holdout")], ["patient_id", "split"])
    with pytest.raises(ValueError, match=r"split.csv: line 3: split must be train, val or test"):
        read_official_split(bad, patient_column="patient_id", pseudonymise=pseud)
    twice = _official(tmp_path, [("P00", "train"), ("P00", "test")], ["patient_id", "split"])
    with pytest.raises(ValueError, match=r"lines 2 and 3 assign one patient to different"):
        read_official_split(twice, patient_column="patient_id", pseudonymise=pseud)
    with pytest.raises(ValueError, match=r"no column 'PatientID'"):
        read_official_split(twice, patient_column="PatientID", pseudonymise=pseud)


def test_write_split_refuses_a_patient_in_two_splits(tmp_path):
    assignment = split_patients(_series(20), n_folds=2, test_fraction=0.2, seed=1)
    leaking = assignment.copy()
    first = leaking.index[leaking[C.PATIENT_PID] == leaking[C.PATIENT_PID].iloc[0]]
    other = {C.SPLIT_TEST: C.SPLIT_DEV, C.SPLIT_DEV: C.SPLIT_TEST}
    leaking.loc[first[0], C.SPLIT] = other[leaking.loc[first[0], C.SPLIT]]
    with pytest.raises(ValueError, match="fall in two splits or folds"):
        write_split(leaking, tmp_path / "folds.tsv")
    assert not (tmp_path / "folds.tsv").exists()


def test_official_test_split_with_cross_validation(tmp_path):
    from radflow.split import apply_official_test_split, read_official_split

    names = ["train"] * 14 + ["val"] * 2 + ["test"] * 4
    path = _official(tmp_path, [(f"P{p:02d}", names[p]) for p in range(20)],
                     ["patient_id", "split"])  # fmt: skip
    official = read_official_split(path, patient_column="patient_id",
                                   pseudonymise=lambda p: "pat-" + p[1:])  # fmt: skip
    assignment = apply_official_test_split(_series(20), official, n_folds=4, seed=3)
    test = set(assignment.loc[assignment[C.SPLIT] == C.SPLIT_TEST, C.PATIENT_PID])
    assert test == {f"pat-{p:02d}" for p in range(16, 20)}
    assert sorted(assignment.loc[assignment[C.SPLIT] == C.SPLIT_DEV, C.FOLD].unique()) == [
        0,
        1,
        2,
        3,
    ]
    again = apply_official_test_split(_series(20), official, n_folds=4, seed=3)
    pd.testing.assert_frame_equal(assignment, again)
