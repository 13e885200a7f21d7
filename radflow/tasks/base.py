"""The task interface: everything a study's task supplies to radflow's stages.

The stages (train, predict, evaluate, figures) are the same for every study. What
differs between classification, segmentation and localisation is the task's: the
network and its loss, what one case's output is, the validation score that selects the
checkpoint, how predictions are written and calibrated, how they are evaluated, and
which figures show the result. A task is a subclass of `Task` that sets the class
attributes and implements the abstract methods below; `radflow.tasks.register` makes it
available under its `name` (config key `task`). tests/toy_task.py is a complete small
example (a regression), run through the whole workflow by tests/test_workflow.py.

Who calls what:

=============  ==============================================================
workflow       evaluation_files, figure_files, case_figure_files (the rules'
               outputs and report entries), calibration_methods (config check),
               preprocessed_layout (the preprocess rules)
train          build_model, loss, outputs, monitor_value; `monitor` names the
               history column of the score (higher is better)
predict        outputs, prediction_table, calibrate, write_predictions
evaluate       read_predictions, evaluate
figures        draw_figures; the stage itself draws the training curves of every
               task from the histories, labelled with monitor_label/monitor_axis
case_figures   draw_case_figures (a rule that exists only where the task
               declares case figures)
=============  ==============================================================

Cases. The stages hand a task the cases as a table with the split table's columns
series_pid, patient_pid, label (the training target, 0/1 today), fold (the fold model
that predicted the row) and split ("val": that model's validation case; "test": a
held-out case, predicted by every fold model).

Planning imports the task's module (the rules take their outputs from the task), so a
task module imports PyTorch, pandas and matplotlib inside the methods that use them:
a dry run must not wait for them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from radflow.models import ModelSettings
    from radflow.train import TrainSettings

__all__ = ["StageFile", "Task"]


@dataclass(frozen=True)
class StageFile:
    """One file that a stage writes for the task, and its entry in the Snakemake report.

    ``file``: the name inside the stage's folder (results/evaluate/ or results/figures/).
    ``category``: the report category it is shown under; None keeps it out of the report.
    ``caption``: a reStructuredText file (best an absolute path) describing it in the
    report, or None. Snakemake renders it with Jinja2 first (``{{ snakemake.params.x }}``).
    ``labels``: the report's labels of the entry, e.g. {"figure": "ROC"}.
    """

    file: str
    category: str | None = None
    caption: str | os.PathLike | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class Task(ABC):
    """What a task supplies to the stages; subclass it and register the subclass.

    A task object is cheap and holds no model: the stages create one each, with the
    training settings where the loss needs them (`train`) and None elsewhere.
    """

    #: The task's name: the value of config key `task` that selects it.
    name: ClassVar[str]
    #: History column of the validation score that selects each fold's checkpoint
    #: (higher is better), e.g. "val_auroc".
    monitor: ClassVar[str]
    #: The score's name in figure titles and report captions, e.g. "AUROC".
    monitor_label: ClassVar[str]
    #: The score's axis label, with its unit, e.g. "AUROC (fraction)".
    monitor_axis: ClassVar[str]
    #: Values of config `evaluate.calibration` the task implements in `calibrate`; the
    #: workflow refuses any other at start-up.
    calibration_methods: ClassVar[tuple[str, ...]] = ("none",)
    #: How the preprocess stage lays out the cases (radflow.conventions.PREPROCESSED_LAYOUTS):
    #: "grid", every case fitted into one fixed grid, one (N, C, *shape) array a shard
    #: (radflow.data.PreprocessedStore); "volumes", nnU-Net's: each case at the plan's
    #: spacing, reoriented and cropped to its foreground, with its mask
    #: (radflow.volumes, radflow.data.VolumeStore). The workflow picks its rules by it.
    preprocessed_layout: ClassVar[str] = "grid"
    #: Whether the evaluation needs held-out test cases (split.test_fraction > 0); a
    #: task that also reports its out-of-fold predictions can do without.
    needs_test_set: ClassVar[bool] = True
    #: Whether `predict_cases` writes files of its own (e.g. masks) into the fold's
    #: folder results/predict/fold<k>/, which the predict rule then declares.
    prediction_files: ClassVar[bool] = False
    #: Whether, for DICOM input, `predict_cases` also writes files that reference the
    #: source series (segmentation: DICOM SEG) into the private folder; the predict
    #: stage then hands it the source files (`source_files`, `private_dir`).
    prediction_references_source: ClassVar[bool] = False
    #: The config section of the task's own settings (e.g. "segmentation"), handed to
    #: the task as `options` by every stage; None: the task has none.
    options_key: ClassVar[str | None] = None

    def __init__(self, train: TrainSettings | None = None, options: Mapping | None = None):
        """`train`: the training settings (config `train:`, `model:`, `seed`) during
        training, for options of the loss (classification: label_smoothing); None in
        the stages that do not train. `options`: config section `options_key`, with the
        schema's defaults (None where the task has none)."""
        self.train = train
        self.options = dict(options or {})

    @classmethod
    def stage_options(cls, stage: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the task's `options` that stage `stage` ("train", "predict",
        "evaluate", "figures") reads: its rule's parameter, so that an option changes
        only the stages that read it (a metric's tolerance must not retrain). Default:
        all of them."""
        return dict(options)

    # ------------------------------------------------------------------- cases
    def open_store(self, preprocessed_dirs: Sequence[str | os.PathLike]):
        """The preprocessed cases of the study's layout: `radflow.data.PreprocessedStore`
        (grid) or `radflow.data.VolumeStore` (volumes); both answer `pid in store`."""
        from radflow.data import PreprocessedStore, VolumeStore

        if self.preprocessed_layout == "volumes":
            return VolumeStore(preprocessed_dirs)
        return PreprocessedStore(preprocessed_dirs)

    def model_inputs(self, store) -> tuple[int, int]:
        """(in_channels, spatial_dims) of the network for the cases of `store`."""
        if self.preprocessed_layout == "volumes":
            image = store.image(store.cases[0])
            return image.shape[0], image.ndim - 1
        return store.case_shape[0], len(store.case_shape) - 1

    def training_data(self, store, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
                      settings: TrainSettings):  # fmt: skip
        """The data object `radflow.train.fit` trains from (see its docstring): by
        default every case of the grid layout in RAM (`radflow.train.ArrayData`), the
        split table's label as the target. A task of the volumes layout supplies its
        own (segmentation: patches)."""
        from radflow import conventions as C
        from radflow.train import ArrayData

        # gathered into RAM once (float16): batches then cost one fancy-index copy each
        return ArrayData(
            store.gather(list(train_rows[C.SERIES_PID])),
            train_rows[C.LABEL].to_numpy(),
            store.gather(list(val_rows[C.SERIES_PID])),
            val_rows[C.LABEL].to_numpy(),
            settings,
        )

    def predict_cases(self, model: nn.Module, store, cases: pd.DataFrame, *,
                      device: torch.device, batch_size: int, out_dir: Path,
                      threads: int = 1, source_files: Mapping[str, list[str]] | None = None,
                      private_dir: Path | None = None) -> pd.DataFrame:  # fmt: skip
        """One fold model's `prediction_table` of `cases` (see the module docstring).
        The default runs the model over the cases' images in batches and hands the
        `outputs` to `prediction_table`; a task whose outputs are images predicts its
        own way and writes them into `out_dir` (declared where `prediction_files`).
        `source_files` (DICOM input of a task with `prediction_files`): per case, the
        DICOM files of the series its converted image was made from; `private_dir`: the
        fold's private folder, for outputs that must reference them (DICOM SEG)."""
        from radflow import conventions as C
        from radflow.inference import predict_logits

        images = store.gather(list(cases[C.SERIES_PID]))
        outputs = self.outputs(predict_logits(model, images, device, batch_size))
        return self.prediction_table(cases, outputs.numpy())

    # ------------------------------------------------------------------ training
    @abstractmethod
    def build_model(
        self, model: ModelSettings, *, in_channels: int, spatial_dims: int
    ) -> nn.Module:
        """A freshly initialised network for images of `in_channels` channels and
        `spatial_dims` (2 or 3) spatial axes, from config `model:`. Its forward pass
        takes (N, in_channels, *spatial) float tensors and returns the logits that
        `loss` and `outputs` take. The same call rebuilds a trained model from its
        checkpoint, so it must depend on nothing but its arguments. A residual
        network honours `model.residual` (False: its plain variant, which the residual
        ablation, radflow.ablation, trains beside it)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch: the model's `logits` and the cases'
        `targets` (the split table's label column, an (N,) integer tensor)."""

    @abstractmethod
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-case outputs (on the CPU) from the logits of N cases: the first axis is
        the case, e.g. (N,) probabilities or (N, *spatial) masks. They feed
        `monitor_value` during training and `prediction_table` afterwards."""

    @abstractmethod
    def monitor_value(self, targets: np.ndarray, outputs: np.ndarray) -> float:
        """The validation score (column `monitor` of the training history; higher is
        better) of `outputs` against `targets`, both for all validation cases. NaN when
        undefined; training then selects by the lowest validation loss."""

    # ------------------------------------------------------------------- predict
    @abstractmethod
    def prediction_table(self, cases: pd.DataFrame, outputs: np.ndarray) -> pd.DataFrame:
        """One fold model's predictions: `cases` (see the module docstring; row i is
        the case of outputs[i]) with the task's output columns added. Returns a new
        table, one row per case, the cases' columns first."""

    def calibrate(self, predictions: pd.DataFrame, method: str) -> pd.DataFrame:
        """Post-hoc calibration of one fold model's `prediction_table`, fitted on its
        split == "val" rows only (never on test rows) and applied to all rows; returns
        the calibrated table. `method` is config `evaluate.calibration`, one of
        `calibration_methods`. The default implements "none" only (unchanged)."""
        if method != "none":
            raise ValueError(
                f"evaluate.calibration: {method!r} does not apply to task {self.name!r}; "
                f"choose one of {', '.join(self.calibration_methods)}"
            )
        return predictions

    def write_predictions(self, predictions: pd.DataFrame, path: str | os.PathLike) -> None:
        """Write one fold's (calibrated) predictions to `path`, atomically. The default
        writes the table as TSV (floats with 6 decimals); a task whose outputs are
        images writes them beside it."""
        from radflow.tables import atomic_path

        with atomic_path(path) as tmp:
            predictions.to_csv(tmp, sep="\t", index=False, float_format="%.6f")

    def read_predictions(self, paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
        """Every fold's predictions, as `write_predictions` wrote them, in one table
        (the input of `evaluate`). The default reads and concatenates the TSVs."""
        import pandas as pd

        from radflow.tables import read_tsv

        return pd.concat([read_tsv(p) for p in paths], ignore_index=True)

    # ------------------------------------------------------------------ evaluate
    @abstractmethod
    def evaluation_files(self) -> dict[str, StageFile]:
        """The files `evaluate` writes into results/evaluate/, by output name (the
        evaluate rule's output names). At least one; all of them are final outputs."""

    @abstractmethod
    def evaluate(
        self, predictions: pd.DataFrame, settings: Mapping[str, Any], out_dir: Path
    ) -> str:
        """Evaluate all folds' predictions (`read_predictions`) with config `evaluate:`
        (`settings`); write every file of `evaluation_files` into `out_dir`, atomically.
        Returns the headline, one line for the log."""

    # ------------------------------------------------------------------- figures
    @abstractmethod
    def figure_files(self) -> dict[str, StageFile]:
        """The figures `draw_figures` writes into results/figures/, by output name. The
        training curves (training_curves.png) are the stage's own: leave them out."""

    @abstractmethod
    def draw_figures(self, evaluation_dir: Path, out: Mapping[str, Path]) -> None:
        """Draw the `figure_files` from the evaluation's files in `evaluation_dir`
        (figures show numbers already computed; they recompute nothing). `out` maps
        each output name of `figure_files` to its path."""

    def case_figure_files(self) -> dict[str, StageFile]:
        """Figures of single cases drawn from the fold models and the preprocessed
        images (classification: Grad-CAM), by output name; written by
        `draw_case_figures` in a rule of their own (case_figures). Default: none."""
        return {}

    def draw_case_figures(
        self,
        *,
        models: Sequence[Path],
        preprocessed: Sequence[Path],
        evaluation_dir: Path,
        annotations: Path,
        settings: Mapping[str, Any],
        out: Mapping[str, Path],
        threads: int,
    ) -> str:
        """Draw the `case_figure_files`: `models` are the fold checkpoints (load them
        with `radflow.inference.load_model`), `preprocessed` the shard folders
        (`radflow.data.PreprocessedStore`), `evaluation_dir` holds the evaluation's
        files, `annotations` the index's annotations table (lesion marks; may have no
        rows), `settings` config `figures:`, `out` the path of each output name, on
        `threads` CPU threads. Returns a line for the log."""
        raise NotImplementedError(f"task {self.name!r} declares no case figures")
