"""3D lesion localisation (lung nodules on CT) on radflow's stages, scored as LUNA16.

What the task adds to the stages (radflow.tasks.base):

- preprocess: the volumes layout (radflow.volumes: isotropic spacing from the config,
  the CT window, the crop to the body), with the index's lesion centres (world mm)
  carried into each case's preprocessed voxels (radflow.lesions).
- train: a residual U-Net (`radflow.models.unet`) with five outputs per voxel, trained
  as a CenterNet-style centre detector (`centres`: heatmap focal loss, offset and size
  L1) on patches, half of them around a nodule, with the segmentation task's 3D
  augmentation (the nodules travel as a label map). The checkpoint is chosen by the
  CPM of fixed validation patches (`patch_cpm`).
- predict: every validation and test case of the fold by sliding windows, peaks of the
  heatmap with NMS in mm, centres mapped to world mm through the case's geometry:
  results/predict/fold<k>/candidates.csv in LUNA16's submission format (seriesuid =
  the series pseudonym), with the fold's ground truth beside it in LUNA16's form.
- evaluate: LUNA16's FROC and CPM (radflow.luna16) with bootstrap CIs over scans, for
  the development scans by their out-of-fold model and for the held-out test scans by
  the fold models' merged candidates; per-nodule hit table.
- figures: FROC curves with CI bands; crops around hits, misses and top false positives.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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

#: Files of a fold's prediction folder results/predict/fold<k>/.
CANDIDATES = "candidates.csv"  # LUNA16 submission: seriesuid, coordX, coordY, coordZ, probability
CANDIDATE_DETAILS = "candidates_detail.tsv"  # ... with diameters and preprocessed voxels
ANNOTATIONS = "annotations.csv"  # the fold's cases' nodules, LUNA16's form
EXCLUDED = "annotations_excluded.csv"
SERIESUIDS = "seriesuids.csv"
#: Prediction-table columns.
PREDICTION_DIR = "prediction_dir"
IMAGE = "image"


@dataclass(frozen=True)
class LocalizationSettings:
    """Config `localization:` (config/schema.yaml has every default)."""

    patch_size: tuple[int, int, int] = (64, 96, 96)
    iterations_per_epoch: int = 100
    oversample_positive: float = 0.5
    validation_patches: int = 4
    overlap: float = 0.25
    threshold: float = 0.05
    max_candidates: int = 50
    nms_distance_mm: float = 5.0
    augment: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LocalizationSettings:
        merged = {**schema_defaults("localization"), **dict(cfg or {})}
        unknown = sorted(set(merged) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"localization: unknown key(s) {unknown}")
        merged["patch_size"] = tuple(int(p) for p in merged["patch_size"])
        bad = [p for p in merged["patch_size"] if p % 16]
        if bad or len(merged["patch_size"]) != 3:
            raise ConfigError(
                f"localization.patch_size {list(merged['patch_size'])}: three axes (z, y, x), "
                "each a multiple of 16 (the U-Net halves it four times)"
            )
        return cls(**merged)

    def augment_settings(self):
        from radflow.tasks.segmentation.augment import SegmentationAugmentSettings

        options = {**schema_defaults("segmentation", "augment"), **dict(self.augment)}
        for key in ("scale", "gamma", "contrast"):
            options[key] = tuple(options[key])
        return SegmentationAugmentSettings(**options)


def case_spacing(row) -> np.ndarray:
    """The preprocessed spacing (z, y, x) mm of a volumes-manifest row (or CaseGeometry)."""
    from radflow.geometry import CaseGeometry

    return np.asarray(CaseGeometry.from_row(row).resampled_spacing_mm, float)


def nodule_case(store, pid: str):
    """A case for patch sampling (`radflow.tasks.segmentation.patches.SegmentationCase`)
    whose label map holds its nodules as balls (`centres.render_nodule_labels`); its
    class locations are per nodule, so a positive patch picks a nodule uniformly."""
    from radflow.tasks.localization.centres import IGNORE, render_nodule_labels
    from radflow.tasks.segmentation.patches import (
        SegmentationCase,
        channel_minimum,
        foreground_locations,
    )

    image = store.image(pid)
    lesions = store.lesions(pid)
    labels, _ = render_nodule_labels(
        image.shape[1:],
        lesions[["z", "y", "x"]].to_numpy(float),
        lesions[C.DIAMETER_MM].to_numpy(float),
        case_spacing(store.row(pid)),
        lesions["excluded"].astype(bool).tolist(),
    )
    locations = {k: v for k, v in foreground_locations(labels).items() if k != IGNORE}
    return SegmentationCase(image, labels, locations, background=channel_minimum(image))


def patch_cpm(labels: np.ndarray, heatmaps: np.ndarray, *, threshold: float = 0.01) -> float:
    """The validation score: LUNA16's CPM over patches instead of scans (without its
    interpolation). Candidates are the heatmap's local maxima; one on a voxel of a
    (fully visible: `centres.patch_targets`) nodule not yet hit in its patch is a hit,
    one on a further voxel of a hit nodule, on an excluded finding or on a cut nodule
    is ignored, any other a false positive. NaN without a nodule."""
    import torch

    from radflow.luna16 import FP_RATES
    from radflow.tasks.localization.centres import heatmap_peaks, patch_targets

    labels = torch.as_tensor(np.asarray(labels))
    targets = patch_targets(labels)
    n_nodules = len(targets["size"])
    if not n_nodules:
        return float("nan")
    valid: dict[int, set[int]] = {}
    for b, *voxel in zip(*(t.tolist() for t in targets["centre"]), strict=True):
        valid.setdefault(b, set()).add(int(labels[(b, *voxel)]))
    hit_scores, fp_scores = [], []
    for b in range(len(heatmaps)):
        peaks, scores = heatmap_peaks(torch.as_tensor(np.asarray(heatmaps[b], np.float32)),
                                      threshold, 100)  # fmt: skip
        hit: set[int] = set()
        for voxel, score in zip(peaks.tolist(), scores.tolist(), strict=True):
            label = int(labels[(b, *voxel)])
            if label in valid.get(b, ()) and label not in hit:
                hit.add(label)
                hit_scores.append(score)
            elif label == 0:
                fp_scores.append(score)
    fp_sorted = np.sort(fp_scores)[::-1]
    hits = np.asarray(hit_scores)
    sensitivities = []
    for rate in FP_RATES:
        allowed = int(rate * len(heatmaps))
        cut = fp_sorted[allowed] if allowed < len(fp_sorted) else -np.inf
        sensitivities.append(float((hits > cut).sum()) / n_nodules)
    return float(np.mean(sensitivities))


# ------------------------------------------------------------------ the task
class Localization(Task):
    name = "localization"
    monitor = "val_cpm"
    monitor_label = "patch CPM"
    monitor_axis = "CPM of validation patches (fraction)"
    preprocessed_layout = C.LAYOUT_VOLUMES
    prediction_files = True
    options_key = "localization"
    needs_test_set = False  # the out-of-fold candidates are scored too

    STAGE_KEYS = {
        "train": ("patch_size", "iterations_per_epoch", "oversample_positive",
                  "validation_patches", "augment"),
        "predict": ("patch_size", "overlap", "threshold", "max_candidates", "nms_distance_mm"),
        "evaluate": ("nms_distance_mm",),
        "figures": (),
    }  # fmt: skip

    def __init__(self, train=None, options=None):
        super().__init__(train, options)
        self.settings = LocalizationSettings.from_config(self.options)

    @classmethod
    def stage_options(cls, stage, options):
        keys = cls.STAGE_KEYS.get(stage)
        return dict(options) if keys is None else {k: options[k] for k in keys if k in options}

    # ------------------------------------------------------------------ training
    def build_model(
        self, model: ModelSettings, *, in_channels: int, spatial_dims: int
    ) -> nn.Module:
        import torch

        from radflow.models.unet import build_unet
        from radflow.tasks.localization.centres import HEATMAP_PRIOR, N_OUTPUTS

        if spatial_dims != 3:
            raise ConfigError(f"task localization takes 3D images, got {spatial_dims}D")
        net = build_unet(model, in_channels=in_channels, n_classes=N_OUTPUTS, spatial_dims=3)
        # CenterNet's start: every voxel a centre with probability HEATMAP_PRIOR, so the
        # focal loss of the (almost all negative) voxels does not swamp the first steps
        with torch.no_grad():
            net.head.bias[0] = -float(np.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        return net

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from radflow.tasks.localization.centres import centre_loss

        return centre_loss(logits, targets)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """The centre heatmap (N, *spatial), probabilities."""
        return logits[:, 0].float().sigmoid().cpu()

    def monitor_value(self, targets: np.ndarray, outputs: np.ndarray) -> float:
        return patch_cpm(targets, outputs)

    def training_data(self, store, train_rows, val_rows, settings):
        train = list(train_rows[C.SERIES_PID])
        val = list(val_rows[C.SERIES_PID])
        n_train = sum(int((~store.lesions(p)["excluded"].astype(bool)).sum()) for p in train)
        if not n_train:
            raise ValueError(
                "no training case of this fold has an annotated lesion: give "
                "data.lesions_table (LUNA16's annotations.csv form)"
            )
        print(f"training on {len(train)} cases with {n_train} lesions")
        from radflow.tasks.segmentation.patches import PatchTrainingData

        # patches around nodules or anywhere; targets are nodule label patches, from
        # which the loss derives the heatmaps (`centres.centre_loss`)
        return PatchTrainingData([nodule_case(store, p) for p in train],
                                 [nodule_case(store, p) for p in val], settings, self.settings,
                                 self.settings.oversample_positive)  # fmt: skip

    # ------------------------------------------------------------------- predict
    def prediction_table(self, cases: pd.DataFrame, outputs: np.ndarray) -> pd.DataFrame:
        """`cases` with the number of candidates of each (`outputs` (N,))."""
        table = cases.copy()
        table["n_candidates"] = np.asarray(outputs, dtype=np.int64).reshape(len(table))
        return table

    def predict_cases(self, model, store, cases, *, device, batch_size, out_dir, threads=1,
                      source_files=None, private_dir=None):  # fmt: skip
        """Sliding-window outputs of every case, their candidates (`centres.
        extract_candidates`) in world mm (LPS) in `out_dir`/candidates.csv (LUNA16's
        submission form, seriesuid = series pseudonym), and the cases' ground truth in
        LUNA16's form beside it (annotations.csv, annotations_excluded.csv,
        seriesuids.csv)."""
        import pandas as pd

        from radflow.runlog import progress
        from radflow.tables import atomic_path
        from radflow.tasks.segmentation.task import converted_paths

        if out_dir is None:
            raise ValueError("localization writes its candidates: give the fold's folder")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        details, truth, counts, images, seconds = [], [], [], [], []
        pids = list(cases[C.SERIES_PID])
        for pid in progress(pids, desc="predict", unit="scan"):
            t0 = time.perf_counter()
            found = detect(model, store.image(pid), store.row(pid), s, device=device,
                           batch_size=batch_size)  # fmt: skip
            for w, p, d, centre in zip(found["points_mm"], found["scores"],
                                       found["diameters_mm"], found["centres"], strict=True):  # fmt: skip
                details.append((pid, *w, p, d, *centre))
            truth.append(store.lesions(pid))
            counts.append(len(found["scores"]))
            images.append(converted_paths(store, pid)["image"])
            seconds.append(time.perf_counter() - t0)
        detail = pd.DataFrame(details, columns=[
            "seriesuid", "coordX", "coordY", "coordZ", "probability", C.DIAMETER_MM,
            "z", "y", "x"])  # fmt: skip
        with atomic_path(out_dir / CANDIDATES) as tmp:
            detail.iloc[:, :5].to_csv(tmp, index=False, float_format="%.4f")
        with atomic_path(out_dir / CANDIDATE_DETAILS) as tmp:
            detail.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
        write_truth(out_dir, pids, truth)
        table = self.prediction_table(cases, np.array(counts))
        table[PREDICTION_DIR] = str(out_dir)
        table[IMAGE] = images
        table["seconds"] = seconds
        return table

    def write_predictions(self, predictions, path) -> None:
        from radflow.tables import atomic_path

        with atomic_path(path) as tmp:
            predictions.to_csv(tmp, sep="\t", index=False, float_format="%.3f")

    # ------------------------------------------------------------------ evaluate
    def evaluation_files(self) -> dict[str, StageFile]:
        from radflow.tasks.localization import evaluation as E

        return {
            "table": StageFile(E.EVAL_FROC_TABLE, "Metrics", REPORT_DIR / "localization_froc.rst",
                               {"table": "FROC sensitivities and CPM, with 95% CIs"}),
            "per_nodule": StageFile(E.EVAL_PER_NODULE, "Metrics",
                                    REPORT_DIR / "localization_per_nodule.rst",
                                    {"table": "per nodule: hit or miss"}),
            "candidates": StageFile(E.EVAL_SUBMISSION),
            "scored": StageFile(E.EVAL_CANDIDATES),
            "metrics": StageFile(E.EVAL_JSON),
        }  # fmt: skip

    def evaluate(self, predictions, settings, out_dir) -> str:
        from radflow.tasks.localization.evaluation import evaluate_localization

        return evaluate_localization(predictions, self.settings, n_boot=settings["n_boot"],
                                     out_dir=Path(out_dir))  # fmt: skip

    # ------------------------------------------------------------------- figures
    def figure_files(self) -> dict[str, StageFile]:
        return {
            "froc": StageFile("localization_froc.png", "Performance",
                              REPORT_DIR / "localization_froc_figure.rst",
                              {"figure": "FROC"}),
            "crops": StageFile("localization_crops.png", "Performance",
                               REPORT_DIR / "localization_crops.rst",
                               {"figure": "hits, misses, false positives"}),
        }  # fmt: skip

    def draw_figures(self, evaluation_dir: Path, out: Mapping[str, Path]) -> None:
        from radflow.tasks.localization.figures import draw_localization_figures

        draw_localization_figures(Path(evaluation_dir), out)


def detect(model, image: np.ndarray, geometry, settings: LocalizationSettings, *, device,
           batch_size: int = 4) -> dict[str, np.ndarray]:  # fmt: skip
    """One model's candidates in one preprocessed volume (C, z, y, x) with `geometry`
    (a volumes-manifest row or a CaseGeometry): sliding-window outputs, heatmap peaks,
    NMS (`centres.extract_candidates`); centres also in world mm (LPS) as `points_mm`."""
    from radflow.geometry import preprocessed_to_world
    from radflow.tasks.localization.centres import centre_activation, extract_candidates
    from radflow.tasks.segmentation.inference import predict_volume
    from radflow.tasks.segmentation.patches import channel_minimum

    outputs = predict_volume(
        model, image, settings.patch_size, overlap=settings.overlap,
        sw_batch_size=max(1, min(batch_size, 4)), activation=centre_activation,
        background=float(channel_minimum(image).min()), device=device,
    )  # fmt: skip
    found = extract_candidates(
        outputs, case_spacing(geometry), threshold=settings.threshold,
        max_candidates=settings.max_candidates, min_distance_mm=settings.nms_distance_mm,
    )  # fmt: skip
    found["points_mm"] = preprocessed_to_world(found["centres"], geometry, frame="LPS").reshape(
        -1, 3
    )
    return found


def write_truth(out_dir: Path, pids, lesion_tables) -> None:
    """The cases' ground truth in LUNA16's form: annotations.csv, annotations_excluded.csv
    (world mm, seriesuid = pseudonym) and seriesuids.csv."""
    import pandas as pd

    from radflow.tables import atomic_path

    table = pd.concat([t for t in lesion_tables if len(t)] or [pd.DataFrame(
        columns=[C.SERIES_PID, "coord_x_mm", "coord_y_mm", "coord_z_mm", C.DIAMETER_MM,
                 "excluded"])], ignore_index=True)  # fmt: skip
    table = table.rename(columns={C.SERIES_PID: "seriesuid", "coord_x_mm": "coordX",
                                  "coord_y_mm": "coordY", "coord_z_mm": "coordZ"})  # fmt: skip
    columns = ["seriesuid", "coordX", "coordY", "coordZ", C.DIAMETER_MM]
    excluded = table["excluded"].astype(bool) if len(table) else pd.Series([], dtype=bool)
    for name, part in ((ANNOTATIONS, table[~excluded]), (EXCLUDED, table[excluded])):
        with atomic_path(out_dir / name) as tmp:
            part[columns].to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_dir / SERIESUIDS) as tmp:
        pd.DataFrame({"seriesuid": list(pids)}).to_csv(tmp, index=False)
