"""The residual connection, measured: plain against residual networks by depth.

A study step (`snakemake ablation`; rules/ablation.smk) that trains the study's own
network with and without its identity additions (`radflow.models.resnet`, `residual`)
at several depths, on the study's data, folds, seeds, schedule and augmentation: each
job is the train stage's `run_fold` with another depth and variant, watched by a
`radflow.gradients.GradientRecorder`. Per (variant, depth, fold) job, in
results/ablation/<variant><depth>/fold<k>/:

* ``model.pt`` and ``history.tsv``: as the train stage writes them (per-epoch training
  and validation loss, the task's monitor, learning rate, throughput);
* ``steps.tsv``: the training loss of every step (`radflow.gradients.STEP_COLUMNS`);
* ``gradients.tsv``: the gradient norm of every weighted layer at initialisation, after
  `ablation.early_steps` steps and at the end (`radflow.gradients.GRADIENT_COLUMNS`);
* ``test_predictions.tsv``: the fold model's outputs on the study's test set (the
  split table's test cases): series_pid, patient_pid, label, output.

`summarise` turns all jobs into results/ablation/summary.tsv: per job and per
(variant, depth) ensemble (the mean of the fold models' outputs, as the study's
ensemble) the task's monitor on the test set with a patient-level bootstrap CI, the
best validation score, the final losses and the gradient ratio between the first and
the last layer. The figures are drawn by `radflow.figures` (plot_ablation_*).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.config import ConfigError
from radflow.tables import atomic_path, read_tsv, write_tsv

__all__ = [
    "JOB_FILES",
    "VARIANTS",
    "AblationJob",
    "ablation_folds",
    "monitor_with_ci",
    "run_ablation_fold",
    "summarise",
    "variant_settings",
    "write_summary",
]

VARIANTS = ("plain", "residual")
#: The files of one job, by output name (rules/ablation.smk uses the same names).
JOB_FILES = {
    "model": "model.pt",
    "history": "history.tsv",
    "steps": "steps.tsv",
    "gradients": "gradients.tsv",
    "test": "test_predictions.tsv",
}
OUTPUT = "output"  # test_predictions.tsv: the task's per-case output
ENSEMBLE = "ensemble"  # summary.tsv: the fold column of the ensemble rows


def job_name(variant: str, depth: int) -> str:
    """The job folder of a (variant, depth): plain34, residual18..."""
    return f"{variant}{depth}"


def ablation_folds(requested: Sequence[int] | None, study_folds: Sequence[int]) -> list[int]:
    """Config `ablation.folds` (None: all of the study's folds), checked against them."""
    if requested is None:
        return list(study_folds)
    unknown = sorted(set(requested) - set(study_folds))
    if unknown:
        raise ConfigError(
            f"ablation.folds: {unknown} are not folds of this study (it has folds "
            f"{list(study_folds)}); list some of those, or null for all"
        )
    return sorted(set(requested))


def variant_settings(settings, variant: str, depth: int):
    """The study's `radflow.train.TrainSettings` with the model's depth and residual
    switch replaced: nothing else differs between the ablation's jobs and the study."""
    if variant not in VARIANTS:
        raise ValueError(f"ablation variant must be one of {VARIANTS}, got {variant!r}")
    model = replace(settings.model, depth=depth, residual=variant == "residual")
    return replace(settings, model=model)


def run_ablation_fold(
    preprocessed_dirs,
    folds_table,
    fold: int,
    *,
    variant: str,
    depth: int,
    task_name: str,
    task_modules=(),
    settings,
    early_steps: int,
    threads: int,
    out: Mapping[str, str | Path],
) -> pd.DataFrame:
    """One ablation job: the train stage's fold `fold` (`radflow.train.run_fold`) with
    the `variant` network of `depth`, its gradients and step losses recorded, then its
    best checkpoint run over the test set. `out` maps each name of JOB_FILES to its
    path. Returns the history."""
    import torch

    from radflow.data import PreprocessedStore
    from radflow.gradients import GradientRecorder
    from radflow.inference import load_model, resolve_device
    from radflow.predict import case_outputs
    from radflow.split import fold_members
    from radflow.tasks import get_task
    from radflow.train import run_fold

    settings = variant_settings(settings, variant, depth)
    recorder = GradientRecorder(early_steps)
    history = run_fold(
        preprocessed_dirs,
        folds_table,
        fold,
        task_name=task_name,
        task_modules=task_modules,
        settings=settings,
        threads=threads,
        model_path=out["model"],
        history_path=out["history"],
        recorder=recorder,
    )
    write_tsv(recorder.step_table(), out["steps"])
    write_tsv(recorder.gradient_table(), out["gradients"])

    task = get_task(task_name, modules=task_modules)
    store = PreprocessedStore(preprocessed_dirs)
    folds = read_tsv(folds_table)
    _, _, test_rows = fold_members(folds[folds[C.SERIES_PID].map(store.__contains__)], fold)
    device = resolve_device(settings.device)
    model, _ = load_model(
        out["model"],
        task,
        in_channels=store.case_shape[0],
        spatial_dims=len(store.case_shape) - 1,
        device=device,
    )
    torch.set_num_threads(max(1, threads))
    outputs = case_outputs(task, model, store, test_rows, device, settings.eval_batch_size)
    if outputs.ndim != 1:
        raise ValueError(
            f"task {task.name!r} gives outputs of shape {tuple(outputs.shape[1:])} per case; "
            "the ablation tabulates one number per case"
        )
    table = test_rows[[C.SERIES_PID, C.PATIENT_PID, C.LABEL]].copy()
    table[OUTPUT] = outputs.numpy()
    with atomic_path(out["test"]) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6f")
    value = task.monitor_value(table[C.LABEL].to_numpy(), table[OUTPUT].to_numpy())
    print(
        f"{job_name(variant, depth)} fold {fold}: test {task.monitor_label} {value:.4f} "
        f"({len(table)} cases)"
    )
    return history


# ------------------------------------------------------------------- summary
def monitor_with_ci(
    task,
    targets: np.ndarray,
    outputs: np.ndarray,
    patients: np.ndarray,
    *,
    n_boot: int,
    alpha: float,
    seed: int = 0,
) -> dict[str, float]:
    """The task's monitor of `outputs` against `targets` with a percentile bootstrap CI
    over patients (radflow.metrics.bootstrap_ci; replicates where it is undefined are
    skipped). The bootstrap resamples case positions, so any per-case output works."""
    from radflow.metrics import bootstrap_ci

    outputs = np.asarray(outputs)
    positions = np.arange(len(outputs), dtype=float)  # already sorted: order is kept

    def metric(y, drawn):
        return task.monitor_value(y, outputs[drawn.astype(int)])

    result = bootstrap_ci(
        metric,
        np.asarray(targets),
        positions,
        groups=np.asarray(patients),
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )
    return {"value": result.point, "ci_low": result.low, "ci_high": result.high}


@dataclass(frozen=True)
class AblationJob:
    """One finished job: its variant, depth, fold and folder (holding JOB_FILES)."""

    variant: str
    depth: int
    fold: int
    folder: Path

    def read(self, name: str) -> pd.DataFrame:
        return read_tsv(self.folder / JOB_FILES[name])


def first_last_gradient_ratio(gradients: pd.DataFrame, snapshot: str) -> float:
    """Gradient norm of the first main-path layer over that of the last one at
    `snapshot`: below 1, the gradient shrinks towards the input (NaN where the last is 0)."""
    rows = gradients[(gradients["snapshot"] == snapshot) & (gradients["path"] == "main")]
    if rows.empty:
        return math.nan
    rows = rows.sort_values("index")
    first, last = rows["grad_norm"].iloc[0], rows["grad_norm"].iloc[-1]
    return first / last if last > 0 else math.nan


SUMMARY_FIRST = ("variant", "depth", "fold", "parameters")


def summarise(
    jobs: Iterable[AblationJob],
    task,
    *,
    parameters: Mapping[tuple[str, int], int],
    n_boot: int,
    alpha: float,
) -> pd.DataFrame:
    """summary.tsv: one row per job and one `ensemble` row per (variant, depth).

    Columns: variant, depth, fold, parameters, test_<monitor> with _ci_low/_ci_high
    (patient bootstrap), n_test_cases, best_epoch, best_val_<monitor>, final_train_loss,
    final_val_loss, grad_first_last_<snapshot> (`first_last_gradient_ratio`) and
    train_time_s. `parameters`: the network size of each (variant, depth).
    """
    monitor = task.monitor
    rows, outputs = [], {}
    for job in sorted(jobs, key=lambda j: (j.variant, j.depth, j.fold)):
        history, test = job.read("history"), job.read("test")
        gradients = job.read("gradients")
        scores = history[monitor]
        best = history.loc[scores.idxmax()] if scores.notna().any() else history.iloc[-1]
        metric = monitor_with_ci(
            task,
            test[C.LABEL].to_numpy(),
            test[OUTPUT].to_numpy(),
            test[C.PATIENT_PID].to_numpy(),
            n_boot=n_boot,
            alpha=alpha,
        )
        rows.append(
            {
                "variant": job.variant,
                "depth": job.depth,
                "fold": str(job.fold),
                "parameters": parameters[job.variant, job.depth],
                **_metric_columns(monitor, metric),
                "n_test_cases": len(test),
                "best_epoch": int(best["epoch"]),
                f"best_val_{monitor.removeprefix('val_')}": best[monitor],
                "final_train_loss": history["train_loss"].iloc[-1],
                "final_val_loss": history["val_loss"].iloc[-1],
                **{
                    f"grad_first_last_{snap}": first_last_gradient_ratio(gradients, snap)
                    for snap in ("init", "early", "end")
                },
                "train_time_s": history["epoch_time_s"].sum(),
            }
        )
        outputs.setdefault((job.variant, job.depth), []).append(test.set_index(C.SERIES_PID))
    for (variant, depth), tables in outputs.items():
        cases = tables[0][[C.PATIENT_PID, C.LABEL]]
        mean = pd.concat([t[OUTPUT] for t in tables], axis=1).mean(axis=1).loc[cases.index]
        metric = monitor_with_ci(
            task,
            cases[C.LABEL].to_numpy(),
            mean.to_numpy(),
            cases[C.PATIENT_PID].to_numpy(),
            n_boot=n_boot,
            alpha=alpha,
        )
        rows.append(
            {
                "variant": variant,
                "depth": depth,
                "fold": ENSEMBLE,
                "parameters": parameters[variant, depth],
                **_metric_columns(monitor, metric),
                "n_test_cases": len(cases),
            }
        )
    return pd.DataFrame(rows)


def _metric_columns(monitor: str, metric: Mapping[str, float]) -> dict[str, float]:
    name = f"test_{monitor.removeprefix('val_')}"
    return {
        name: metric["value"],
        f"{name}_ci_low": metric["ci_low"],
        f"{name}_ci_high": metric["ci_high"],
    }


_JOB_FOLDER = re.compile(r"^(?P<variant>plain|residual)(?P<depth>\d+)$")


def job_from_folder(folder: str | Path) -> AblationJob:
    """The job of a folder results/ablation/<variant><depth>/fold<k>."""
    folder = Path(folder)
    match = _JOB_FOLDER.match(folder.parent.name)
    if not match or not folder.name.startswith("fold"):
        raise ValueError(f"{folder} is not an ablation job folder (<variant><depth>/fold<k>)")
    return AblationJob(match["variant"], int(match["depth"]), int(folder.name[4:]), folder)


def _keyed(job: AblationJob, table: pd.DataFrame) -> pd.DataFrame:
    keys = {"variant": job.variant, "depth": job.depth, "fold": job.fold}
    return table.drop(columns=[C.FOLD], errors="ignore").assign(**keys)


def write_summary(
    job_folders: Iterable[str | Path],
    preprocessed_dirs,
    *,
    task_name: str,
    task_modules=(),
    model: Mapping,
    evaluate: Mapping,
    out: Mapping[str, Path],
) -> pd.DataFrame:
    """The ablation_summary stage: summary.tsv (`summarise`, with config `evaluate:`'s
    n_boot and alpha) and the three figures (`out`: summary, training_loss,
    gradient_norms, test_metric). `model`: config `model:` (width, pooling...), with
    which each (variant, depth) network is built to count its parameters for images of
    the preprocessed shards' shape."""
    from radflow import figures
    from radflow.data import PreprocessedStore
    from radflow.models import ModelSettings
    from radflow.tasks import get_task

    task = get_task(task_name, modules=task_modules)
    jobs = sorted(
        (job_from_folder(f) for f in job_folders), key=lambda j: (j.variant, j.depth, j.fold)
    )
    shape = PreprocessedStore(preprocessed_dirs).case_shape
    base = ModelSettings.from_config(model)
    parameters = {}
    for variant, depth in {(j.variant, j.depth) for j in jobs}:
        settings = replace(base, depth=depth, residual=variant == "residual")
        net = task.build_model(settings, in_channels=shape[0], spatial_dims=len(shape) - 1)
        parameters[variant, depth] = sum(p.numel() for p in net.parameters())
    summary = summarise(
        jobs, task, parameters=parameters, n_boot=evaluate["n_boot"], alpha=evaluate["alpha"]
    )
    write_tsv(summary, out["summary"])
    steps = pd.concat([_keyed(j, j.read("steps")) for j in jobs], ignore_index=True)
    histories = pd.concat([_keyed(j, j.read("history")) for j in jobs], ignore_index=True)
    gradients = pd.concat([_keyed(j, j.read("gradients")) for j in jobs], ignore_index=True)
    figures.plot_ablation_training(steps, histories, out["training_loss"])
    figures.plot_ablation_gradients(gradients, out["gradient_norms"])
    figures.plot_ablation_test_metric(
        summary,
        out["test_metric"],
        monitor=task.monitor,
        monitor_label=task.monitor_label,
        monitor_axis=task.monitor_axis,
    )
    name = f"test_{task.monitor.removeprefix('val_')}"
    for row in summary[summary["fold"] == ENSEMBLE].itertuples():
        value, low, high = (getattr(row, c) for c in (name, f"{name}_ci_low", f"{name}_ci_high"))
        print(
            f"{job_name(row.variant, row.depth)}: ensemble test {task.monitor_label} "
            f"{value:.3f} (CI {low:.3f}-{high:.3f}), {row.parameters:,} parameters"
        )
    return summary
