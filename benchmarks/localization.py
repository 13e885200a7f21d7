"""What the localisation task costs on this machine's CPU (printed, not tested).

    python benchmarks/localization.py [--threads 2] [--patch 32 64 64] [--batch 4]
        [--volume 64 170 150] [--repeats 3]

For the demo's detector (the residual U-Net, depth 10, width 8, five outputs), with
`--threads` PyTorch threads:

* a training step (forward, centre loss, backward, AdamW) on a batch from the task's
  patch loader (nodule label maps, 3D augmentation in its background thread) against
  making one batch alone: the training is loader-bound if the ratio nears 1;
* one scan's detection (`radflow.tasks.localization.task.detect`: sliding windows,
  Gaussian blending, heatmap peaks, NMS, world coordinates) against MONAI's bare
  `sliding_window_inference` of the same model over the same volume (the reference,
  timed in the same run): the ratio is what peaks, NMS and geometry add;
* LUNA16 scoring (`radflow.luna16.score`) of LUNA16's real annotations (888 scans, 1186
  nodules, ../shared/data/luna16) with 100 candidates per scan, without and with the
  1000-replicate bootstrap, against MONAI's `compute_froc_curve_data` +
  `compute_froc_score` on the same hit assignment (which has no matching and no CI).

Wall-clock seconds (median of `--repeats`) and process CPU seconds; the load average is
printed with the results (a busy machine's wall clock includes waiting for cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from radflow.models import ModelSettings
from radflow.tasks.localization.centres import render_nodule_labels
from radflow.tasks.localization.task import Localization, detect
from radflow.tasks.segmentation.patches import (
    PatchLoader,
    SegmentationCase,
    channel_minimum,
    foreground_locations,
    sample_batch,
)

LUNA16 = Path(__file__).resolve().parents[2] / "shared" / "data" / "luna16"


def _timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _case(shape, rng) -> SegmentationCase:
    image = rng.normal(0.3, 0.1, (1, *shape)).astype(np.float16)
    centres = rng.uniform(8, np.array(shape) - 8, (4, 3))
    labels, _ = render_nodule_labels(shape, centres, rng.uniform(5, 25, 4), (2.0, 2.0, 2.0))
    return SegmentationCase(image, labels, foreground_locations(labels),
                            background=channel_minimum(image))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--volume", type=int, nargs=3, default=[64, 170, 150])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    task = Localization(options={"patch_size": args.patch})
    model = task.build_model(ModelSettings.from_config({"depth": 10, "base_width": 8}),
                             in_channels=1, spatial_dims=3)  # fmt: skip
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")  # fmt: skip

    # ---- training step vs making a batch
    cases = [_case(tuple(args.volume), rng) for _ in range(4)]
    loader = PatchLoader(cases, args.patch, args.batch, 10**6, seed=0,
                         oversample_foreground=0.5,
                         augment=task.settings.augment_settings())  # fmt: skip
    batches = iter(loader)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        x, y = next(batches)
        loss = task.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def make():
        sample_batch(cases, args.patch, args.batch, rng, oversample_foreground=0.5)

    step_s, step_cpu = _timed(step, args.repeats)
    make_s, make_cpu = _timed(make, args.repeats)
    print(f"training step, batch {args.batch} x {args.patch}: {step_s:.2f} s "
          f"(CPU {step_cpu:.2f} s); making a batch alone (no augmentation) {make_s:.3f} s: "
          f"{make_s / step_s:.1%} of a step")  # fmt: skip

    # ---- detection of one scan vs MONAI's bare sliding windows
    from monai.inferers import sliding_window_inference

    from radflow.geometry import CaseGeometry

    volume = cases[0].image.astype(np.float32)
    shape = tuple(args.volume)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    geometry = CaseGeometry(shape[::-1], affine, (0, 0, 0), shape, shape)
    model.eval()
    ours, ours_cpu = _timed(lambda: detect(model, volume, geometry, task.settings,
                                           device=torch.device("cpu")), args.repeats)  # fmt: skip

    @torch.no_grad()
    def reference():
        sliding_window_inference(torch.from_numpy(volume)[None], args.patch, 4, model,
                                 overlap=task.settings.overlap, mode="gaussian")  # fmt: skip

    ref, ref_cpu = _timed(reference, args.repeats)
    print(f"detection of a {shape} scan: radflow {ours:.2f} s (CPU {ours_cpu:.2f}), MONAI "
          f"sliding_window_inference alone {ref:.2f} s (CPU {ref_cpu:.2f}): ratio {ours / ref:.2f}")  # fmt: skip

    # ---- LUNA16 scoring
    if not LUNA16.is_dir():
        print("LUNA16 scoring: ../shared/data/luna16 absent, skipped")
        return
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    from radflow.luna16 import FP_RATES, read_annotations, read_seriesuids, score

    annotations = read_annotations(LUNA16 / "annotations.csv")
    excluded = read_annotations(LUNA16 / "annotations_excluded.csv")
    scans = read_seriesuids(LUNA16 / "seriesuids.csv")
    rows = []
    by_scan = {s: g for s, g in annotations.groupby("seriesuid")}
    for scan in scans:
        nodules = by_scan.get(scan)
        for k in range(100):
            if nodules is not None and k < len(nodules) and rng.random() < 0.8:
                centre = nodules.iloc[k][["coordX", "coordY", "coordZ"]].to_numpy(float)
                rows.append((scan, *(centre + rng.normal(0, 1, 3)), rng.uniform(0.5, 1)))
            else:
                rows.append((scan, *rng.uniform(-150, 150, 3), rng.uniform(0, 0.9)))
    candidates = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ",
                                             "probability"])  # fmt: skip
    t = time.perf_counter()
    plain = score(annotations, excluded, scans, candidates, n_boot=1)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    score(annotations, excluded, scans, candidates, n_boot=1000)
    boot_s = time.perf_counter() - t
    status = plain.per_candidate["status"]
    tp_prob = plain.per_nodule.loc[plain.per_nodule["hit"], "probability"].to_numpy()
    fp_prob = candidates.loc[status == "fp", "probability"].to_numpy()
    t = time.perf_counter()
    # MONAI skips its lowest threshold: one extra FP below every score restores it
    fps, sens = compute_froc_curve_data(np.r_[fp_prob, -1.0], tp_prob, len(plain.per_nodule),
                                        len(scans))  # fmt: skip
    monai_cpm = compute_froc_score(fps, sens, FP_RATES)
    monai_s = time.perf_counter() - t
    interpolated = score(annotations, excluded, scans, candidates, n_boot=1,
                         reading="interpolate").cpm  # fmt: skip
    print(f"LUNA16 scoring of {len(candidates)} candidates on {len(scans)} scans: matching + "
          f"FROC {plain_s:.2f} s, with 1000 bootstraps {boot_s:.2f} s; MONAI FROC on the same "
          f"hits (no matching, no CI) {monai_s:.3f} s: ratio {plain_s / monai_s:.1f}; CPM "
          f"{plain.cpm:.4f} (the script's grid), {interpolated:.4f} read as MONAI reads it, "
          f"MONAI {monai_cpm:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
