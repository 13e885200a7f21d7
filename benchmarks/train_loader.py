"""Is training data-loader-bound? Throughput of radflow's training step fed by its
BatchIterator from memory-mapped preprocessed shards, against the same steps fed from a
batch already in device memory (the upper bound: no loading at all), in one run.

    python benchmarks/train_loader.py [--images 4096] [--size 128] [--width 16] [--steps 60]

Prints images/s of the reference (the same shuffled batches pre-built on the device) and
of radflow's loader from RAM (as the train stage runs) and from the memory map (studies
larger than RAM), the ratio to the reference (1.00 = loading costs nothing) and the
fraction of time spent waiting for data. Runs on CUDA when available, else on the CPU with all
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
from radflow.models import ModelSettings
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
        ModelSettings(depth=args.depth, base_width=args.width), in_channels=1, spatial_dims=2
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

        n = args.steps * args.batch
        order = rng.permutation(args.images)[:n]

        def timed(batches) -> tuple[float, float]:
            """images/s and the fraction of time spent waiting for the next batch."""
            wait = 0.0
            if on_cuda:
                torch.cuda.synchronize()
            t0 = t_data = time.perf_counter()
            for x, y in batches:
                x = x.to(device, non_blocking=True).float().contiguous(memory_format=fmt)
                y = y.to(device, non_blocking=True)
                wait += time.perf_counter() - t_data
                _step(model, task, optimizer, x, y, gen, settings, autocast_dtype, device)
                t_data = time.perf_counter()
            if on_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            return n / elapsed, wait / elapsed

        # reference: the same batches, already built as float32 tensors on the device
        resident = [
            (
                torch.from_numpy(np.array(store[np.sort(order[i : i + args.batch])]))
                .to(device)
                .float()
                .contiguous(memory_format=fmt),
                torch.from_numpy(targets[np.sort(order[i : i + args.batch])]).to(device),
            )
            for i in range(0, n, args.batch)
        ]
        timed(resident[:5])  # warm-up: allocator, cuDNN autotuning
        reference, _ = timed(resident)
        del resident
        # radflow, as the train stage runs it: training set gathered into RAM once
        in_ram = np.array(store)
        ram, ram_wait = timed(BatchIterator(in_ram, targets, order, args.batch, pin_memory=on_cuda))
        # radflow on a study too large for RAM: batches gathered from the memory map
        mapped, map_wait = timed(
            BatchIterator(store, targets, order, args.batch, pin_memory=on_cuda)
        )

    where = torch.cuda.get_device_name(0) if on_cuda else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.machine()} {where}; torch {torch.__version__}")
    print(
        f"model: ResNet-{args.depth} width {args.width}, {args.size}x{args.size}, "
        f"batch {args.batch}, {args.steps} steps"
    )
    print(f"reference (batches resident on {device.type}): {reference:8.1f} images/s")
    print(
        f"radflow, training set in RAM:   {ram:8.1f} images/s, ratio {ram / reference:.2f}, "
        f"data wait {100 * ram_wait:.1f}%"
    )
    print(
        f"radflow, from the memory map:   {mapped:8.1f} images/s, ratio {mapped / reference:.2f}, "
        f"data wait {100 * map_wait:.1f}%"
    )


if __name__ == "__main__":
    main()
