"""Centre heatmaps: nodule ground truth as label maps, training targets, loss, decoding.

The detector (CenterNet's recipe in 3D, on radflow's residual U-Net) predicts per voxel
five channels: a centre heatmap logit, the sub-voxel offset (z, y, x) of a centre from
the voxel, and the log of the nodule's diameter in voxels. Ground truth travels as a
*nodule label map*: each annotated nodule a ball of its own id (1..254) in a uint8
volume, excluded findings `IGNORE` (255). Patches, flips, rotations and scaling are then
the segmentation task's (`radflow.tasks.segmentation.patches` / `augment`, nearest-
neighbour labels), and the targets of a patch are derived from its (augmented) label
patch: a nodule's centre is the centroid of its voxels, its diameter that of a ball of
as many voxels. A nodule cut by the patch border (fewer voxels than a fraction of its
full ball) has no reliable centroid: its voxels are ignored by the loss, as are excluded
findings.

Heatmap target: exp(-d^2 / (2 sigma^2)) around each centre voxel (the maximum where two
overlap), sigma = max(1, radius / 3) voxels, exactly 1 at the centre voxel; the loss is
CenterNet's penalty-reduced focal loss (alpha 2, beta 4) normalised by the number of
centres, plus L1 on offset and log size at the centre voxels.

Decoding (`extract_candidates`): local maxima of the sigmoid heatmap (3x3x3 max-pool)
above a threshold, refined by the predicted offset, then a greedy non-maximum
suppression in millimetres: a candidate closer than max(its radius, the kept one's,
`min_distance_mm`) to a kept higher-scoring one is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255
MAX_NODULES = 254
#: A nodule keeps its target only if at least this fraction of its ball is in the patch.
MIN_VISIBLE_FRACTION = 0.6
N_OUTPUTS = 5  # heatmap, offset z, y, x, log diameter (voxels)
SIZE_WEIGHT = 0.1
#: Initial heatmap probability of every voxel (the head's bias): CenterNet's 0.1 is for
#: 2D maps at stride 4; a 3D map at stride 1 has ~10^5 negatives per centre.
HEATMAP_PRIOR = 0.001
OFFSET_WEIGHT = 1.0


def ball_volume_voxels(diameter_vox: float) -> float:
    return math.pi / 6 * diameter_vox**3


def render_nodule_labels(
    shape: Sequence[int],
    centres_zyx: np.ndarray,
    diameters_mm: Sequence[float],
    spacing_zyx: Sequence[float],
    excluded: Sequence[bool] = (),
    *,
    excluded_diameter_mm: float = 10.0,
    min_diameter_vox: float = 1.5,
) -> tuple[np.ndarray, dict[int, float]]:
    """The nodule label map of one case: (uint8 volume of `shape`, {id: full ball voxel
    count}). Included nodules get ids 1, 2, ... in row order (balls of their diameter,
    at least `min_diameter_vox` voxels across so a 3 mm nodule on a 2 mm grid is still
    a few voxels); excluded findings become IGNORE balls (diameter < 0: LUNA16's 10 mm),
    drawn first so that a nodule overlapping one keeps its voxels."""
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    spacing = np.asarray(spacing_zyx, float)
    excluded = list(excluded) or [False] * len(centres_zyx)
    order = sorted(range(len(centres_zyx)), key=lambda i: not excluded[i])  # excluded first
    counts: dict[int, float] = {}
    next_id = 1
    for i in order:
        diameter = float(diameters_mm[i])
        if excluded[i] and diameter <= 0:
            diameter = excluded_diameter_mm
        radius_vox = np.maximum(diameter / 2 / spacing, min_diameter_vox / 2)
        centre = np.asarray(centres_zyx[i], float)
        lo = np.maximum(np.floor(centre - radius_vox).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radius_vox).astype(int) + 1, labels.shape)
        if np.any(hi <= lo):
            if not excluded[i]:
                next_id += 1  # a nodule outside the array keeps its id's place
            continue
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        inside = (
            sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius_vox, strict=True)) <= 1
        )
        box = labels[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        if excluded[i]:
            box[inside] = IGNORE
            continue
        if next_id > MAX_NODULES:
            raise ValueError(f"more than {MAX_NODULES} nodules in one case")
        box[inside] = next_id
        counts[next_id] = float(np.prod(2 * radius_vox) * math.pi / 6)
        next_id += 1
    return labels, counts


def patch_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training targets of a batch of nodule label patches (N, *spatial) int:

    heatmap (N, *spatial) float, weight (N, *spatial) (0 on excluded findings and on
    nodules cut by the border, else 1), and at the centre voxels (index tuples `centre`)
    the offset (n, 3) and log diameter in voxels (n,) targets."""
    n, spatial = labels.shape[0], labels.shape[1:]
    device = labels.device
    heatmap = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    weight = (labels != IGNORE).float()
    grids = torch.meshgrid(*(torch.arange(s, device=device, dtype=torch.float32) for s in spatial),
                           indexing="ij")  # fmt: skip
    centres, offsets, sizes = [], [], []
    for b in range(n):
        patch = labels[b]
        ids = torch.unique(patch)
        ids = ids[(ids > 0) & (ids != IGNORE)]
        for k in ids.tolist():
            voxels = patch == k
            count = int(voxels.sum())
            coords = [g[voxels].mean() for g in grids]
            diameter = (6 * count / math.pi) ** (1 / 3)
            touches = any(
                bool(voxels.index_select(a, torch.tensor([0, s - 1], device=device)).any())
                for a, s in enumerate(spatial)
            )
            if touches and count < MIN_VISIBLE_FRACTION * _largest_count(patch, k, count):
                weight[b][voxels] = 0.0
                continue
            centre = torch.stack(coords)
            voxel = centre.round().clamp(min=torch.zeros(len(spatial), device=device),
                                         max=torch.tensor(spatial, device=device) - 1)  # fmt: skip
            sigma = max(1.0, diameter / 6)
            d2 = sum((g - c) ** 2 for g, c in zip(grids, voxel, strict=True))
            heatmap[b] = torch.maximum(heatmap[b], torch.exp(-d2 / (2 * sigma**2)))
            index = (b, *(int(v) for v in voxel.tolist()))
            centres.append(index)
            offsets.append(centre - voxel)
            sizes.append(math.log(max(diameter, 1.0)))
    if centres:
        index = tuple(torch.tensor(col, device=device) for col in zip(*centres, strict=True))
        offset = torch.stack(offsets)
        size = torch.tensor(sizes, device=device)
    else:
        index = tuple(
            torch.zeros(0, dtype=torch.long, device=device) for _ in range(1 + len(spatial))
        )
        offset = torch.zeros((0, len(spatial)), device=device)
        size = torch.zeros(0, device=device)
    return {"heatmap": heatmap, "weight": weight, "centre": index, "offset": offset, "size": size}


def _largest_count(patch: torch.Tensor, k: int, count: int) -> float:
    """A lower bound of a cut nodule's full voxel count: the ball whose radius is the
    largest extent of its visible voxels along an axis (a cut ball keeps its full width
    along the cut face)."""
    coords = torch.nonzero(patch == k)
    if not len(coords):
        return float(count)
    extent = float((coords.max(0).values - coords.min(0).values + 1).max())
    return max(float(count), ball_volume_voxels(extent))


def centre_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CenterNet's loss of a batch: `logits` (N, 5, *spatial), `labels` nodule label
    patches (N, *spatial) (module docstring)."""
    targets = patch_targets(labels)
    logits = logits.float()
    heat = logits[:, 0]
    y, w = targets["heatmap"], targets["weight"]
    log_p, log_not_p = F.logsigmoid(heat), F.logsigmoid(-heat)
    p = heat.sigmoid()
    positive = y >= 1.0 - 1e-6
    pos_loss = -((1 - p) ** 2) * log_p * positive
    neg_loss = -((1 - y) ** 4) * p**2 * log_not_p * (~positive)
    n_centres = max(1, len(targets["size"]))
    loss = ((pos_loss + neg_loss) * w).sum() / n_centres
    if len(targets["size"]):
        # (n, 5): the outputs at the centre voxels
        regress = logits.permute(0, *range(2, logits.dim()), 1)[targets["centre"]]
        loss = loss + OFFSET_WEIGHT * F.l1_loss(regress[:, 1:4], targets["offset"])
        loss = loss + SIZE_WEIGHT * F.l1_loss(regress[:, 4], targets["size"])
    return loss


def centre_activation(logits: torch.Tensor) -> torch.Tensor:
    """The network's outputs as blended by sliding-window inference: heatmap
    probability, offsets and log size as they are."""
    out = logits.float().clone()
    out[:, 0] = out[:, 0].sigmoid()
    return out


def heatmap_peaks(
    heatmap: torch.Tensor, threshold: float, max_peaks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local maxima (3x3x3) of a (*spatial) probability map above `threshold`: (k, dims)
    voxel indices and their scores, highest first, at most `max_peaks`."""
    pooled = F.max_pool3d(heatmap[None, None], 3, stride=1, padding=1)[0, 0]
    peaks = (heatmap == pooled) & (heatmap > threshold)
    index = torch.nonzero(peaks)
    scores = heatmap[peaks]
    order = torch.argsort(scores, descending=True)[:max_peaks]
    return index[order], scores[order]


def nms_mm(points_mm: np.ndarray, radii_mm: np.ndarray, scores: np.ndarray,
           min_distance_mm: float) -> np.ndarray:  # fmt: skip
    """Indices kept by greedy distance-based non-maximum suppression, by falling score:
    a point within max(its radius, the kept point's, `min_distance_mm`) of a kept point
    is dropped."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    for i in order:
        if kept:
            d = np.linalg.norm(points_mm[kept] - points_mm[i], axis=1)
            reach = np.maximum(np.maximum(radii_mm[kept], radii_mm[i]), min_distance_mm)
            if np.any(d < reach):
                continue
        kept.append(int(i))
    return np.array(kept, dtype=int)


def extract_candidates(
    outputs: torch.Tensor,
    spacing_zyx: Sequence[float],
    *,
    threshold: float,
    max_candidates: int,
    min_distance_mm: float,
) -> dict[str, np.ndarray]:
    """Candidates of one volume's blended outputs (5, *spatial): centres (k, 3) in
    preprocessed voxel indices (z, y, x, fractional), diameters (k,) mm, scores (k,),
    highest first, after NMS; at most `max_candidates`."""
    spacing = np.asarray(spacing_zyx, float)
    index, scores = heatmap_peaks(outputs[0], threshold, 20 * max_candidates)
    if not len(index):
        return {"centres": np.zeros((0, 3)), "diameters_mm": np.zeros(0), "scores": np.zeros(0)}
    at = tuple(index.T)
    offset = torch.stack([outputs[1 + a][at] for a in range(3)], 1).clamp(-1.0, 1.0)
    centres = index.double().numpy() + offset.double().numpy()
    diameters = np.exp(outputs[4][at].double().numpy().clip(-2, 6)) * float(np.mean(spacing))
    scores_np = scores.double().numpy()
    keep = nms_mm(centres * spacing, diameters / 2, scores_np, min_distance_mm)[:max_candidates]
    return {"centres": centres[keep], "diameters_mm": diameters[keep], "scores": scores_np[keep]}


def merge_candidates(
    groups: Sequence[dict[str, np.ndarray]], min_distance_mm: float
) -> dict[str, np.ndarray]:
    """An ensemble of several models' candidates of one scan (world mm): candidates of
    different models closer than max(radius, `min_distance_mm`) are one cluster, scored
    by the sum of its members' best scores per model over the number of models (a model
    that found nothing there adds 0), placed at the score-weighted mean."""
    k = len(groups)
    points = np.concatenate([g["points_mm"] for g in groups]) if groups else np.zeros((0, 3))
    if not len(points):
        return {"points_mm": np.zeros((0, 3)), "diameters_mm": np.zeros(0), "scores": np.zeros(0)}
    diameters = np.concatenate([g["diameters_mm"] for g in groups])
    scores = np.concatenate([g["scores"] for g in groups])
    model = np.concatenate([np.full(len(g["scores"]), m) for m, g in enumerate(groups)])
    order = np.argsort(-scores, kind="stable")
    used = np.zeros(len(points), bool)
    out_p, out_d, out_s = [], [], []
    for i in order:
        if used[i]:
            continue
        d = np.linalg.norm(points - points[i], axis=1)
        member = (~used) & (d < max(diameters[i] / 2, min_distance_mm))
        best = {}
        for j in np.flatnonzero(member):
            if model[j] not in best or scores[j] > scores[best[model[j]]]:
                best[model[j]] = j
        chosen = np.array(list(best.values()))
        used[member] = True
        w = scores[chosen]
        out_p.append((points[chosen] * w[:, None]).sum(0) / w.sum())
        out_d.append(float(np.average(diameters[chosen], weights=w)))
        out_s.append(float(w.sum() / k))
    return {
        "points_mm": np.array(out_p),
        "diameters_mm": np.array(out_d),
        "scores": np.array(out_s),
    }
