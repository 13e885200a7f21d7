"""3D segmentation on radflow's stages: a residual U-Net, patch training, masks out.

What the task adds to the stages (radflow.tasks.base):

- preprocess: the volumes layout (radflow.volumes): each case at the plan's spacing,
  cropped to its foreground, z-scored, with its mask.
- train: `radflow.models.unet` (config model: depth 10/18/34, base_width) on patches
  (`patches.PatchLoader`: a third centred on foreground, 3D augmentation), Dice + cross-
  entropy over the classes of config `segmentation.labels`; after each epoch the
  pseudo-Dice of fixed validation patches (nnU-Net's) selects the checkpoint.
- predict: every validation and test case of the fold by sliding windows
  (`inference.predict_volume`, Gaussian-weighted), restored onto the converted image's
  voxel grid (`radflow.geometry.restore_native`) and written as a NIfTI label map with
  the converted image's affine: results/predict/fold<k>/<pid>.nii.gz.
- evaluate: per case and region (`segmentation.regions`), Dice, HD95, surface Dice,
  volumes and lesion-wise detection in mm on the native grid (`metrics`), means with
  patient-level bootstrap CIs; the held-out test cases through the ensemble of the fold
  models (a per-voxel vote), the development cases through their out-of-fold model.
- figures: overlays of the best, median and worst case, metric strip plots.

Class numbering: the network's class k (1..K) is the k-th entry of
`segmentation.labels`; masks and written predictions hold the label values.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflow import conventions as C
from radflow.config import ConfigError, schema_defaults
from radflow.tasks.base import StageFile, Task

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from radflow.models import ModelSettings

REPORT_DIR = Path(__file__).resolve().parents[3] / "report"

#: Prediction-table columns: paths relative to the working directory.
PREDICTION = "prediction"  # the predicted label map (NIfTI on the converted grid)
REFERENCE = "reference"  # the converted mask (the ground truth), "" without one
IMAGE = "image"  # the converted image
#: `split` of the rows the evaluation adds: the test cases' fold-model ensemble.
ENSEMBLE_FOLD = -1
#: Evaluation sets: development cases by the fold model that did not train on them,
#: and held-out test cases by the ensemble of all fold models.
SET_OUT_OF_FOLD = "out-of-fold"
SET_TEST = "test (ensemble)"
#: Metrics summarised with CIs (columns of metrics.RegionMetrics).
SUMMARY_METRICS = (
    "dice", "hd95_mm", "nsd", "volume_error_ml", "lesion_f1", "lesion_precision",
    "lesion_recall",
)  # fmt: skip

EVAL_PER_CASE = "per_case.tsv"
EVAL_SUMMARY = "metrics.tsv"
EVAL_JSON = "metrics.json"


@dataclass(frozen=True)
class SegmentationSettings:
    """Config `segmentation:` (config/schema.yaml has every default)."""

    labels: Mapping[str, int] = field(default_factory=lambda: {"lesion": 1})
    regions: Mapping[str, Sequence[str]] | None = None
    patch_size: tuple[int, int, int] = (64, 64, 64)
    iterations_per_epoch: int = 250
    oversample_foreground: float = 1 / 3
    validation_patches: int = 4
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    nsd_tolerance_mm: float = 2.0
    min_lesion_mm3: float = 0.0
    lesion_connectivity: int = 26
    augment: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SegmentationSettings:
        merged = {**schema_defaults("segmentation"), **dict(cfg or {})}
        unknown = sorted(set(merged) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"segmentation: unknown key(s) {unknown}")
        merged["patch_size"] = tuple(int(p) for p in merged["patch_size"])
        merged["mirror_axes"] = tuple(int(a) for a in merged["mirror_axes"])
        settings = cls(**merged)
        settings.check()
        return settings

    def check(self) -> None:
        values = list(self.labels.values())
        if len(set(values)) != len(values):
            raise ConfigError(
                f"segmentation.labels: two classes share a label value: {self.labels}"
            )
        for name, members in self.region_classes().items():
            unknown = sorted(set(members) - set(self.labels))
            if unknown:
                raise ConfigError(
                    f"segmentation.regions.{name}: {unknown} are not classes of "
                    f"segmentation.labels ({sorted(self.labels)})"
                )
        bad = [p for p in self.patch_size if p % 16]
        if bad:
            raise ConfigError(
                f"segmentation.patch_size {list(self.patch_size)}: every axis must be a "
                "multiple of 16 (the U-Net halves it four times)"
            )

    def region_classes(self) -> dict[str, list[str]]:
        """Region -> class names; the default region "lesion" unites every class."""
        if not self.regions:
            return {"lesion": list(self.labels)}
        return {name: list(members) for name, members in self.regions.items()}

    def region_values(self) -> dict[str, list[int]]:
        """Region -> the label values it unites (for `metrics.region_metrics`)."""
        return {
            name: [int(self.labels[c]) for c in members]
            for name, members in self.region_classes().items()
        }

    @property
    def n_classes(self) -> int:
        """Network outputs: background and one per class."""
        return len(self.labels) + 1

    def class_of_value(self) -> np.ndarray:
        """Lookup table label value -> class index (0..K), 256 entries; values that are
        no class map to 255 (caught by `check_mask_values`)."""
        lut = np.full(256, 255, dtype=np.int64)
        lut[0] = 0
        for k, value in enumerate(self.labels.values(), start=1):
            lut[int(value)] = k
        return lut

    def value_of_class(self) -> np.ndarray:
        """Class index -> label value (0 for background)."""
        return np.array([0, *(int(v) for v in self.labels.values())], dtype=np.uint16)

    def augment_settings(self):
        from radflow.tasks.segmentation.augment import SegmentationAugmentSettings

        options = {**schema_defaults("segmentation", "augment"), **dict(self.augment)}
        for key in ("scale", "gamma", "contrast"):
            options[key] = tuple(options[key])
        return SegmentationAugmentSettings(**options)


def check_mask_values(store, pids: Sequence[str], settings: SegmentationSettings) -> None:
    """Every foreground value of every case's preprocessed mask must be a class of
    config segmentation.labels; else an error naming the case and the values."""
    known = set(int(v) for v in settings.labels.values())
    problems = []
    for pid in pids:
        stray = sorted(set(store.label_voxels(pid)) - known)
        if stray:
            problems.append(f"{pid}: {stray}")
    if problems:
        raise ConfigError(
            f"masks hold label values that are not in segmentation.labels "
            f"({dict(settings.labels)}): {'; '.join(problems[:10])}"
            + (f" (and {len(problems) - 10} more cases)" if len(problems) > 10 else "")
            + ". Add them to segmentation.labels, or map them (data.mask_labels for DICOM SEG)."
        )


# ------------------------------------------------------------------ training data
# ------------------------------------------------------------------ the task
class Segmentation(Task):
    name = "segmentation"
    monitor = "val_dice"  # pseudo-Dice of the validation patches, mean over classes
    monitor_label = "pseudo-Dice"
    monitor_axis = "Dice of validation patches (fraction)"
    preprocessed_layout = C.LAYOUT_VOLUMES
    prediction_files = True
    prediction_references_source = True  # DICOM SEG
    options_key = "segmentation"
    needs_test_set = False  # the out-of-fold predictions are evaluated too

    #: Which keys of config segmentation: each stage reads (`stage_options`).
    STAGE_KEYS = {
        "train": ("labels", "patch_size", "iterations_per_epoch", "oversample_foreground",
                  "validation_patches", "augment"),
        "predict": ("labels", "patch_size", "overlap", "mirror_axes"),
        "evaluate": ("labels", "regions", "nsd_tolerance_mm", "min_lesion_mm3",
                     "lesion_connectivity"),
        "figures": ("labels", "regions"),
    }  # fmt: skip

    def __init__(self, train=None, options=None):
        super().__init__(train, options)
        self.settings = SegmentationSettings.from_config(self.options)

    @classmethod
    def stage_options(cls, stage, options):
        keys = cls.STAGE_KEYS.get(stage)
        return dict(options) if keys is None else {k: options[k] for k in keys if k in options}

    # ------------------------------------------------------------------ training
    def build_model(
        self, model: ModelSettings, *, in_channels: int, spatial_dims: int
    ) -> nn.Module:
        from radflow.models.unet import build_unet

        return build_unet(
            model,
            in_channels=in_channels,
            n_classes=self.settings.n_classes,
            spatial_dims=spatial_dims,
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from radflow.tasks.segmentation.loss import dice_ce_loss

        return dice_ce_loss(logits, targets)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-voxel class (N, *spatial), uint8."""
        import torch

        return logits.argmax(1).to(dtype=torch.uint8).cpu()

    def monitor_value(self, targets: np.ndarray, outputs: np.ndarray) -> float:
        """nnU-Net's pseudo-Dice: per class, Dice of all validation patches pooled,
        averaged over the classes present in the targets or the outputs; NaN if none."""
        scores = []
        for k in range(1, self.settings.n_classes):
            t, o = targets == k, outputs == k
            total = int(t.sum()) + int(o.sum())
            if total:
                scores.append(2 * int((t & o).sum()) / total)
        return float(np.mean(scores)) if scores else float("nan")

    def training_data(self, store, train_rows, val_rows, settings):
        pids = {
            "training": list(train_rows[C.SERIES_PID]),
            "validation": list(val_rows[C.SERIES_PID]),
        }
        for part, members in pids.items():
            missing = [pid for pid in members if store.mask(pid) is None]
            if missing:
                print(f"{len(missing)} {part} cases have no mask and are left out")
                pids[part] = [pid for pid in members if pid not in set(missing)]
            if not pids[part]:
                raise ValueError(f"no {part} case of this fold has a mask")
        check_mask_values(store, pids["training"] + pids["validation"], self.settings)
        from radflow.tasks.segmentation.patches import PatchData

        return PatchData.from_store(store, pids["training"], pids["validation"], settings,
                                    self.settings)  # fmt: skip

    # ------------------------------------------------------------------- predict
    def prediction_table(self, cases: pd.DataFrame, outputs: np.ndarray) -> pd.DataFrame:
        """`cases` with the predicted volume of each class in voxels of the native grid
        (`outputs`: (N, K) counts, classes in segmentation.labels order)."""
        table = cases.copy()
        outputs = np.asarray(outputs).reshape(len(table), -1)
        for k, name in enumerate(self.settings.labels):
            table[f"voxels_{name}"] = outputs[:, k].astype(np.int64)
        return table

    def predict_cases(self, model, store, cases, *, device, batch_size, out_dir, threads=1,
                      source_files=None, private_dir=None):  # fmt: skip
        """Sliding-window prediction of every case, restored onto its converted image's
        grid and written to `out_dir`/<pid>.nii.gz (label values). For DICOM input also
        a DICOM SEG per case, `private_dir`/<pid>.dcm, referencing the series the
        converted image was made from (`dicom_seg`: pseudonymous patient module, the
        source's UIDs, hence the private folder)."""
        from radflow.geometry import CaseGeometry, restore_native, write_label_nifti
        from radflow.runlog import progress
        from radflow.tasks.segmentation.inference import predict_volume

        if out_dir is None:
            raise ValueError("segmentation writes its masks: give the fold's folder (out_dir)")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        values = self.settings.value_of_class()
        counts, paths, references, images, seconds = [], [], [], [], []
        for pid in progress(list(cases[C.SERIES_PID]), desc="predict", unit="case"):
            t0 = time.perf_counter()
            row = store.row(pid)
            probabilities = predict_volume(
                model,
                store.image(pid),
                self.settings.patch_size,
                overlap=self.settings.overlap,
                sw_batch_size=max(1, min(batch_size, 4)),
                mirror_axes=self.settings.mirror_axes,
                background=0.0,
                device=device,
            )
            classes = restore_native(probabilities.numpy(), row)
            labels = values[classes]
            path = out_dir / f"{pid}{C.NIFTI_SUFFIX}"
            write_label_nifti(path, labels, row)
            if private_dir is not None and source_files and pid in source_files:
                self._write_seg(private_dir, pid, labels, CaseGeometry.from_row(row),
                                source_files[pid], cases)  # fmt: skip
            counts.append(np.bincount(classes.ravel(), minlength=self.settings.n_classes)[1:])
            paths.append(str(path))
            nifti = converted_paths(store, pid)
            images.append(nifti["image"])
            references.append(nifti["mask"] if row["has_mask"] else "")
            seconds.append(time.perf_counter() - t0)
        table = self.prediction_table(cases, np.array(counts).reshape(len(cases), -1))
        table[PREDICTION] = paths
        table[REFERENCE] = references
        table[IMAGE] = images
        table["seconds"] = seconds
        return table

    def _write_seg(self, private_dir, pid, labels, geometry, files, cases) -> None:
        from radflow.dicom import radflow_version
        from radflow.tasks.segmentation.dicom_seg import write_prediction_seg

        patient = cases.loc[cases[C.SERIES_PID] == pid, C.PATIENT_PID].iloc[0]
        Path(private_dir).mkdir(parents=True, exist_ok=True)
        write_prediction_seg(
            Path(private_dir) / f"{pid}.dcm",
            labels,
            geometry.native_affine,
            files,
            segments={int(v): name for name, v in self.settings.labels.items()},
            patient_pid=str(patient),
            algorithm_version=radflow_version(),
        )

    def write_predictions(self, predictions, path) -> None:
        from radflow.tables import atomic_path

        with atomic_path(path) as tmp:
            predictions.to_csv(tmp, sep="\t", index=False, float_format="%.3f")

    # ------------------------------------------------------------------ evaluate
    def evaluation_files(self) -> dict[str, StageFile]:
        return {
            "table": StageFile(
                EVAL_SUMMARY,
                "Metrics",
                REPORT_DIR / "segmentation_metrics.rst",
                {"table": "per region, with 95% CIs"},
            ),
            "per_case": StageFile(
                EVAL_PER_CASE,
                "Metrics",
                REPORT_DIR / "segmentation_per_case.rst",
                {"table": "per case and region"},
            ),
            "metrics": StageFile(EVAL_JSON),
        }

    def evaluate(self, predictions, settings, out_dir) -> str:
        from radflow.tasks.segmentation.evaluation import evaluate_segmentation

        return evaluate_segmentation(
            predictions,
            self.settings,
            n_boot=settings["n_boot"],
            alpha=settings["alpha"],
            out_dir=Path(out_dir),
        )

    # ------------------------------------------------------------------- figures
    def figure_files(self) -> dict[str, StageFile]:
        return {
            "overlays": StageFile(
                "segmentation_overlays.png",
                "Performance",
                REPORT_DIR / "segmentation_overlays.rst",
                {"figure": "best, median and worst case"},
            ),
            "metric_strips": StageFile(
                "segmentation_metrics.png",
                "Performance",
                REPORT_DIR / "segmentation_strips.rst",
                {"figure": "metrics per case and region"},
            ),
        }

    def draw_figures(self, evaluation_dir: Path, out: Mapping[str, Path]) -> None:
        from radflow.tasks.segmentation.evaluation import draw_segmentation_figures

        draw_segmentation_figures(Path(evaluation_dir), self.settings, out)


def converted_paths(store, pid: str) -> dict[str, str]:
    """The converted image and mask of a case of a `radflow.data.VolumeStore`: the
    convert stage's results/nifti/<shard>/ beside results/preprocessed/<shard>/."""
    shard_dir = Path(store.shard_dir(pid))
    nifti = shard_dir.parent.parent / C.NIFTI_DIR / shard_dir.name
    return {
        "image": str(nifti / f"{pid}{C.NIFTI_SUFFIX}"),
        "mask": str(nifti / f"{pid}{C.MASK_SUFFIX}"),
    }
