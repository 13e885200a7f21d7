import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.split import fold_members, split_patients


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
