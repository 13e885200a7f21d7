"""Prediction stage: each fold model scores its own validation fold and the test set.

Out-of-fold validation predictions let the evaluation tune what it needs (a threshold, a
calibration) without touching the test set; the test predictions of all folds form the
ensemble. What a prediction is belongs to the task (radflow.tasks.base.Task): the stage
runs the model over the cases and hands the outputs to the task, which tabulates them
(`prediction_table`), calibrates them on the fold's validation cases where config
`evaluate.calibration` asks for it (`calibrate`) and writes them (`write_predictions`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from radflow import conventions as C
from radflow.inference import load_model, predict_logits, resolve_device
from radflow.split import fold_members
from radflow.tables import read_tsv
from radflow.tasks import get_task


def predict_fold(
    model_path,
    preprocessed_dirs,
    folds_table,
    fold: int,
    *,
    task_name: str,
    task_modules=(),
    task_options=None,
    device: str = "auto",
    batch_size: int = 64,
    threads: int = 1,
    calibration: str = "none",
    out_path,
    out_dir=None,
    shard_tables=(),
    dicom_root=None,
    private_dir=None,
) -> pd.DataFrame:
    """Write the fold model's predictions of its validation fold and the test set, and
    return them as the task's prediction table (after calibration).

    The cases given to the task: series_pid, patient_pid, label, fold, split ("val" for
    the fold's validation cases, "test" for held-out ones). `task_name`/`task_modules`:
    config `task`/`task_modules`, `task_options` the task's settings; `calibration`:
    config `evaluate.calibration`; `out_dir`: the fold's folder for the files a task
    with `prediction_files` writes (masks); `shard_tables`, `dicom_root`: the index's
    private file lists and the DICOM root, from which each case's source series is found
    for outputs written into `private_dir` (DICOM SEG).
    """
    import torch

    torch.set_num_threads(max(1, threads))
    task = get_task(task_name, modules=task_modules, options=task_options)
    store = task.open_store(preprocessed_dirs)
    folds = read_tsv(folds_table)
    folds = folds[folds[C.SERIES_PID].map(store.__contains__)]
    _, val_rows, test_rows = fold_members(folds, fold)
    torch_device = resolve_device(device)
    in_channels, spatial_dims = task.model_inputs(store)
    model, _ = load_model(
        model_path, task, in_channels=in_channels, spatial_dims=spatial_dims, device=torch_device
    )
    cases = []
    for split, rows in ((C.SPLIT_VAL, val_rows), (C.SPLIT_TEST, test_rows)):
        frame = rows[[C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
        frame[C.FOLD] = fold
        frame[C.SPLIT] = split
        cases.append(frame)
    predictions = task.predict_cases(
        model,
        store,
        pd.concat(cases, ignore_index=True),
        device=torch_device,
        batch_size=batch_size,
        out_dir=Path(out_dir) if out_dir is not None else None,
        threads=threads,
        **_sources(shard_tables, dicom_root, private_dir),
    )
    predictions = task.calibrate(predictions, calibration)
    task.write_predictions(predictions, out_path)
    print(f"fold {fold}: predicted {len(val_rows)} validation and {len(test_rows)} test cases")
    return predictions


def _sources(shard_tables, dicom_root, private_dir) -> dict:
    """predict_cases' source_files and private_dir, where the stage has them."""
    if not shard_tables or not dicom_root or private_dir is None:
        return {}
    from radflow.tasks.segmentation.dicom_seg import reference_files

    return {
        "source_files": reference_files(shard_tables, dicom_root),
        "private_dir": Path(private_dir),
    }


def case_outputs(task, model, store, rows: pd.DataFrame, device, batch_size):
    """The task's per-case outputs (a CPU tensor, first axis the case) of `model` for
    the split-table `rows`, their images gathered from `store`."""
    images = store.gather(list(rows[C.SERIES_PID]))
    return task.outputs(predict_logits(model, images, device, batch_size))
