"""Grad-CAM (Selvaraju et al. 2017) for the fold models, averaged over the ensemble.

For a case, each fold model's class-activation map at `layer` is the ReLU of the
feature maps weighted by the spatially averaged gradient of the positive-class logit;
maps are upsampled to the input grid, averaged over folds and scaled to [0, 1]. The
figure stage draws them over the preprocessed image with the ground-truth lesion marks
(when the study has annotations), so a reader sees whether the ensemble looks at the
lesion or at something else (a shortcut).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from radflow import conventions as C
from radflow.preprocess import mapping_from_row
from radflow.tables import read_tsv


def grad_cam(
    model: nn.Module, images: torch.Tensor, layer: str, target_class: int = 1
) -> np.ndarray:
    """CAMs (N, *spatial) in [0, 1] for a batch (N, C, *spatial) at module `layer`."""
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(
            f"figures.cam_layer {layer!r} is not a module of the model; use e.g. layer3 or layer4"
        )
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["maps"] = output

    handle = module.register_forward_hook(keep)
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        logits = model(images.float().requires_grad_(False))
        logits[:, target_class].sum().backward()
    finally:
        handle.remove()
    maps, grads = captured["maps"], captured["maps"].grad
    spatial_axes = tuple(range(2, maps.dim()))
    weights = grads.mean(dim=spatial_axes, keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    cam = F.interpolate(cam, size=images.shape[2:], mode=mode, align_corners=False)[:, 0]
    return cam.detach().cpu().numpy()


def _unit_scale(cam: np.ndarray) -> np.ndarray:
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def ensemble_cam(models: list[nn.Module], images: np.ndarray, layer: str) -> np.ndarray:
    """Mean over models of each model's CAM, each scaled to [0, 1] first (so one model's
    larger gradients do not dominate), then rescaled to [0, 1] per case."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    total = np.zeros((len(images), *images.shape[2:]), dtype=np.float64)
    for model in models:
        cams = grad_cam(model, x, layer)
        total += np.stack([_unit_scale(c) for c in cams])
    return np.stack([_unit_scale(c) for c in total])


def lesion_marks(annotations: pd.DataFrame, manifest_row: dict) -> list[tuple[float, float, float]]:
    """Annotated lesions of one case as (row, col, radius) in the preprocessed grid."""
    mapping = mapping_from_row(manifest_row)
    marks = []
    for _, ann in annotations.iterrows():
        row, col = mapping.to_output((float(ann[C.ROW_PX]), float(ann[C.COL_PX])))
        radius = float(ann[C.DIAMETER_MM]) / 2 / mapping.out_spacing_mm[0]
        marks.append((row, col, radius))
    return marks


def cam_hits_lesion(
    cam: np.ndarray, marks: list[tuple[float, float, float]], margin_px: float = 2.0
) -> bool:
    """Pointing game: does the CAM's maximum fall within a marked lesion (plus margin)?"""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return any(np.hypot(row - r, col - c) <= rad + margin_px for r, c, rad in marks)


def run_cam_figures(
    model_paths,
    preprocessed_dirs,
    per_case_table,
    annotations_table,
    *,
    task,
    layer: str,
    n_cases: int,
    out_true_positive,
    out_false_positive,
    threads: int = 1,
) -> dict:
    """The Grad-CAM figure stage: the `n_cases` most confident true and false positives
    of the ensemble on the test set, with the ensemble CAM and the lesion marks.
    `task` (a classification task) rebuilds the fold models from their checkpoints.
    Returns the pointing-game counts for the log."""
    from radflow.data import PreprocessedStore
    from radflow.figures import plot_cam_grid
    from radflow.inference import load_model

    torch.set_num_threads(max(1, threads))
    store = PreprocessedStore(preprocessed_dirs)
    per_case = read_tsv(per_case_table)
    test = per_case[per_case[C.SPLIT] == C.SPLIT_TEST]
    annotations = read_tsv(annotations_table)
    models = [
        load_model(
            path,
            task,
            in_channels=store.case_shape[0],
            spatial_dims=len(store.case_shape) - 1,
            device=torch.device("cpu"),
        )[0]
        for path in model_paths
    ]
    counts = {}
    for outcome, out_path in (("TP", out_true_positive), ("FP", out_false_positive)):
        chosen = test[test[C.OUTCOME] == outcome]
        shown = f"test {outcome}"
        if chosen.empty:
            # nothing called wrongly/rightly at the threshold: the closest calls are the
            # most informative (highest-scored cases of the class the outcome belongs to)
            chosen = test[test[C.LABEL] == (1 if outcome == "TP" else 0)]
            shown = (
                f"no test {outcome} at the threshold; highest-scored label-{int(outcome == 'TP')}"
            )
        chosen = chosen.sort_values(C.PROB, ascending=False).head(n_cases)
        images = store.gather(list(chosen[C.SERIES_PID])) if len(chosen) else None
        cams = ensemble_cam(models, images, layer) if len(chosen) else []
        items, hits, annotated = [], 0, 0
        for k, (_, case) in enumerate(chosen.iterrows()):
            case_annotations = annotations[annotations[C.SERIES_PID] == case[C.SERIES_PID]]
            marks = lesion_marks(case_annotations, store.row(case[C.SERIES_PID]))
            if marks:
                annotated += 1
                hits += cam_hits_lesion(cams[k], marks)
            image, cam = images[k, 0].astype(np.float32), np.asarray(cams[k])
            caption = f"{case[C.SERIES_PID]}\np={case[C.PROB]:.2f} label={int(case[C.LABEL])}"
            if image.ndim == 3:  # a volume: maximum projections along the first axis
                image, cam, caption = image.max(axis=0), cam.max(axis=0), f"{caption} (MIP)"
            items.append({"image": image, "cam": cam, "caption": caption, "circles": marks})
        title = f"Grad-CAM ({layer}, mean of {len(models)} fold models): {shown}"
        if annotated:
            title += f"; CAM peak on a lesion in {hits}/{annotated}"
        plot_cam_grid(items, out_path, title)
        counts[outcome] = {"shown": len(items), "annotated": annotated, "peak_on_lesion": hits}
    return counts
