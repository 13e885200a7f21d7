"""Is training data-loader-bound? Throughput of radflow's training step fed by its
BatchIterator from memory-mapped preprocessed shards, against the same steps fed from a
batch already in device memory (the upper bound: no loading at all), in one run.

    python benchmarks/train_loader.py [--images 4096] [--size 128] [--width 16] [--steps 60]

Prints images/s of both, the ratio (1.00 = the loader costs nothing) and the fraction of
step time spent waiting for data. Runs on CUDA when available, else on the CPU with all
cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radflow.augment import AugmentSettings, augment_batch
from radflow.data import BatchIterator
from radflow.tasks import get_task


def _step(model, task, optimizer, x, y, gen, settings, autocast_dtype, device):
    x = augment_batch(x, settings, gen)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = task.loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    on_cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else None
    task = get_task("classification")
    model = task.build_model(
        {"depth": args.depth, "base_width": args.width}, in_channels=1, spatial_dims=2
    ).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = AugmentSettings()
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if on_cuda else torch.contiguous_format

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        images = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float16, shape=(args.images, 1, args.size, args.size)
        )
        rng = np.random.default_rng(0)
        for start in range(0, args.images, 512):
            stop = min(args.images, start + 512)
            images[start:stop] = rng.random((stop - start, 1, args.size, args.size))
        images.flush()
        del images
        store = np.load(path, mmap_mode="r")
        targets = rng.integers(0, 2, args.images)

        # reference: one batch resident on the device, no loading at all
        x0 = torch.from_numpy(np.asarray(store[: args.batch])).to(device).float()
        x0 = x0.contiguous(memory_format=fmt)
        y0 = torch.from_numpy(targets[: args.batch]).to(device)
        for _ in range(5):
            _step(model, task, optimizer, x0, y0, gen, settings, autocast_dtype, device)
        if on_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            _step(model, task, optimizer, x0, y0, gen, settings, autocast_dtype, device)
        if on_cuda:
            torch.cuda.synchronize()
        reference = args.steps * args.batch / (time.perf_counter() - t0)

        # radflow: shuffled batches gathered from the memory map in a background thread
        order = rng.permutation(args.images)[: args.steps * args.batch]
        loader = BatchIterator(store, targets, order, args.batch, pin_memory=on_cuda)
        wait = 0.0
        t0 = t_data = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).float().contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            wait += time.perf_counter() - t_data
            _step(model, task, optimizer, x, y, gen, settings, autocast_dtype, device)
            t_data = time.perf_counter()
        if on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        measured = len(order) / elapsed

    where = torch.cuda.get_device_name(0) if on_cuda else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.machine()} {where}; torch {torch.__version__}")
    print(
        f"model: ResNet-{args.depth} width {args.width}, {args.size}x{args.size}, "
        f"batch {args.batch}, {args.steps} steps"
    )
    print(f"reference (batch resident on {device.type}): {reference:8.1f} images/s")
    print(f"radflow BatchIterator from memory map:   {measured:8.1f} images/s")
    print(
        f"ratio radflow/reference: {measured / reference:.2f}; "
        f"data wait {100 * wait / elapsed:.1f}% of step time"
    )


if __name__ == "__main__":
    main()
