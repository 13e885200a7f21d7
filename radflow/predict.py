"""Prediction stage: each fold model scores its own validation fold and the test set.

Out-of-fold validation predictions let the evaluation choose an operating threshold
without touching the test set; the test predictions of all folds form the ensemble.
With `calibrate`, each fold's probabilities are Platt-scaled on its validation fold
(radflow.calibration) so the folds share one probability scale before averaging.
"""

from __future__ import annotations

import pandas as pd

from radflow import conventions as C
from radflow.calibration import apply_platt, fit_platt
from radflow.data import PreprocessedStore
from radflow.inference import load_model, predict_logits, resolve_device
from radflow.split import fold_members
from radflow.tables import atomic_path
from radflow.tasks import get_task

UNCALIBRATED = f"{C.PROB}_uncalibrated"


def predict_fold(
    model_path,
    preprocessed_dirs,
    folds_table,
    fold: int,
    *,
    task_name: str,
    device: str = "auto",
    batch_size: int = 64,
    threads: int = 1,
    calibrate: bool = True,
    out_path,
) -> pd.DataFrame:
    """Write and return the fold model's predictions: series_pid, patient_pid, label,
    fold, split ("val" for its validation cases, "test" for held-out ones), prob (after
    calibration, if any) and prob_uncalibrated."""
    import torch

    torch.set_num_threads(max(1, threads))
    task = get_task(task_name)
    store = PreprocessedStore(preprocessed_dirs)
    folds = pd.read_csv(folds_table, sep="\t", dtype={C.SERIES_PID: str, C.PATIENT_PID: str})
    folds = folds[folds[C.SERIES_PID].map(store.__contains__)]
    _, val_rows, test_rows = fold_members(folds, fold)
    torch_device = resolve_device(device)
    model, _ = load_model(
        model_path,
        task,
        in_channels=store.case_shape[0],
        spatial_dims=len(store.case_shape) - 1,
        device=torch_device,
    )
    frames = []
    for split, rows in ((C.SPLIT_VAL, val_rows), (C.SPLIT_TEST, test_rows)):
        images = store.gather(list(rows[C.SERIES_PID]))
        outputs = task.outputs(predict_logits(model, images, torch_device, batch_size)).numpy()
        frame = rows[[C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
        frame[C.FOLD] = fold
        frame[C.SPLIT] = split
        frame[C.PROB] = outputs
        frames.append(frame)
    predictions = pd.concat(frames, ignore_index=True)
    predictions[UNCALIBRATED] = predictions[C.PROB]
    if calibrate:
        val = predictions[C.SPLIT] == C.SPLIT_VAL
        a, b = fit_platt(predictions.loc[val, C.LABEL].to_numpy(), predictions.loc[val, C.PROB])
        predictions[C.PROB] = apply_platt(predictions[UNCALIBRATED].to_numpy(), a, b)
        print(f"fold {fold}: Platt scaling on validation predictions: a={a:.3f}, b={b:.3f}")
    with atomic_path(out_path) as tmp:
        predictions.to_csv(tmp, sep="\t", index=False, float_format="%.6f")
    print(f"fold {fold}: predicted {len(val_rows)} validation and {len(test_rows)} test cases")
    return predictions
