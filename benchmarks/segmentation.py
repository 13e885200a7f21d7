"""What the segmentation network costs on this machine's CPU (printed, not tested).

    python benchmarks/segmentation.py [--threads 2] [--patches 64 96] [--volume 160 192 160]
        [--repeats 3] [--base-width 16] [--depth 18] [--no-inference]

For the default U-Net (radflow.models.unet, depth 18, width 16: 16-256 channels, 2 input
channels as BraTS-like T1c + FLAIR, 4 classes), with `--threads` PyTorch threads:

* forward + backward of a batch of two patches per patch size;
* a full training step (forward, Dice + CE loss, backward, AdamW step) on batches from
  `PatchLoader` (sampling + augmentation in its background thread, whose CPU time the
  step's includes) over a synthetic memory-mapped case of `--volume`, and what making
  one batch costs (sampling + augmentation, timed on its own);
* sliding-window inference of one `--volume` volume (overlap 0.5, Gaussian blending,
  windows of each patch size, no mirroring; with mirroring over three axes it is 8x).

* with `--metrics`, the evaluation's metrics of a BraTS-sized case (240 x 240 x 155 at
  1 mm, a ~100 mL lesion shifted by 3 mm, scattered false positives): radflow's
  `region_metrics` for one region (Dice, HD95, surface Dice, volumes, lesion counts)
  against MONAI's DiceMetric + HausdorffDistanceMetric(95) + SurfaceDiceMetric on the
  same masks, the reference, timed in the same run; the ratio is printed;
* inference is also timed against MONAI's own `sliding_window_inference` with its
  Gaussian mode on the same windows (the reference; radflow's differs in its weight map
  and mirroring), ratio printed.

Wall-clock seconds (median of `--repeats`) and the process's CPU seconds over the same
span: on a shared machine the wall clock includes waiting for cores, the CPU time does
not (with T threads, wall >= CPU / T). The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radflow.models import ModelSettings
from radflow.models.unet import build_unet, check_patch_size
from radflow.tasks.segmentation.augment import (
    SegmentationAugmentSettings,
    augment_segmentation_batch,
)
from radflow.tasks.segmentation.inference import predict_volume
from radflow.tasks.segmentation.loss import DiceCELoss
from radflow.tasks.segmentation.patches import (
    PatchLoader,
    SegmentationCase,
    foreground_locations,
    sample_batch,
)


def _timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """(median wall s, median CPU s) of `repeats` calls, after one warm-up call."""
    if warm_up:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _report(name: str, timing: tuple[float, float]) -> None:
    wall, cpu = timing
    print(f"{name:<46}  {wall:8.2f} s wall  {cpu:8.2f} s CPU", flush=True)


def _synthetic_case(folder: Path, shape) -> SegmentationCase:
    """A memory-mapped float16 two-channel volume with an ellipsoidal 'lesion'."""
    rng = np.random.default_rng(0)
    image = np.lib.format.open_memmap(folder / "image.npy", "w+", np.float16, (2, *shape))
    image[:] = rng.standard_normal((2, *shape), dtype=np.float32)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    inside = sum(((g - s / 2) / (s / 8)) ** 2 for g, s in zip(grid, shape, strict=True)) < 1
    label = np.where(inside, 1, 0).astype(np.uint8)
    label[tuple(s // 2 for s in shape)] = 2
    image.flush()
    image = np.load(folder / "image.npy", mmap_mode="r")
    return SegmentationCase(image, label, foreground_locations(label))


def _metrics_benchmark(repeats: int) -> None:
    """radflow's per-region metrics against MONAI's on a BraTS-sized case."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    from radflow.tasks.segmentation.metrics import SegmentationMetricSettings, region_metrics

    shape = (240, 240, 155)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = (120, 110, 80)
    ref = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < 29**2
    pred = np.roll(ref, 3, axis=0)
    pred = pred | (np.random.default_rng(0).random(shape) < 1e-4)
    settings = SegmentationMetricSettings(nsd_tolerance_mm=1.0)

    def ours():
        region_metrics(pred.astype(np.uint8), ref.astype(np.uint8), (1, 1, 1),
                       {"whole": [1]}, settings)  # fmt: skip

    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()

    def monai():
        DiceMetric()(p, r)
        HausdorffDistanceMetric(percentile=95)(p, r)
        SurfaceDiceMetric(class_thresholds=[1.0])(p, r)

    mine, reference = _timed(ours, repeats), _timed(monai, repeats)
    _report("metrics 240x240x155, one region (radflow)", mine)
    _report("  MONAI Dice + HD95 + surface Dice (reference)", reference)
    print(f"  ratio radflow / MONAI: {mine[0] / reference[0]:.2f} (wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--volume", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_unet(
        ModelSettings(depth=args.depth, base_width=args.base_width), in_channels=2, n_classes=4
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; U-Net depth {args.depth} width {args.base_width}: "
        f"widths {model.widths}, {parameters:,} parameters"
    )
    loss_fn = DiceCELoss()
    augment = SegmentationAugmentSettings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as folder:
        case = _synthetic_case(Path(folder), args.volume)
        for size in args.patches:
            patch = check_patch_size((size,) * 3, model.n_stages)
            x = torch.randn(2, 2, *patch)
            y = torch.randint(0, 4, (2, *patch))

            def forward_backward(x=x, y=y):
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()

            _report(f"forward+backward, 2 x {size}^3", _timed(forward_backward, args.repeats))

            loader = PatchLoader([case], patch, 2, args.repeats + 1, seed=0, augment=augment)
            batches = iter(loader)

            def train_step(batches=batches):
                images, labels = next(batches)
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            _report(
                f"training step (loader + AdamW), 2 x {size}^3", _timed(train_step, args.repeats)
            )

            # what the loader's thread does per batch, timed here in the main thread
            rng, generator = np.random.default_rng(1), torch.Generator().manual_seed(1)

            def make_batch(patch=patch, rng=rng, generator=generator):
                images, labels = sample_batch([case], patch, 2, rng)
                augment_segmentation_batch(
                    torch.from_numpy(images), torch.from_numpy(labels), augment, generator
                )

            _report(
                f"loader batch (sample + augment), 2 x {size}^3", _timed(make_batch, args.repeats)
            )

            if not args.inference:
                continue
            image = np.asarray(case.image)
            volume = "x".join(map(str, args.volume))

            def infer(image=image, patch=patch):
                predict_volume(model, image, patch, overlap=0.5, sw_batch_size=2)

            ours = _timed(infer, 1, warm_up=False)
            _report(f"inference {volume}, windows {size}^3", ours)

            def monai_infer(image=image, patch=patch):
                from monai.inferers import sliding_window_inference

                with torch.no_grad():
                    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
                    sliding_window_inference(x, patch, 2, model.eval(), overlap=0.5,
                                             mode="gaussian")  # fmt: skip

            reference = _timed(monai_infer, 1, warm_up=False)
            _report("  MONAI sliding_window_inference (reference)", reference)
            print(f"  ratio radflow / MONAI: {ours[0] / reference[0]:.2f} (wall)")
            model.train()
    if args.metrics:
        _metrics_benchmark(args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
