"""Access to preprocessed shards and a prefetching batch iterator.

In the grid layout the preprocess stage writes per shard a memory-mappable `images.npy`
(N, C, *spatial) and a manifest in array order; `PreprocessedStore` opens all shards
lazily and gathers cases by series pseudonym. In the volumes layout (radflow.volumes)
each case has its own arrays; `VolumeStore` lists the cases and memory-maps one case's
image and mask on demand. `BatchIterator` builds each batch in a background thread
(numpy's fancy indexing releases the GIL), so reading from a memory map overlaps the
training step; on CUDA the batch is pinned for an asynchronous host-to-device copy.
`prefetched` is that thread on its own, for other loaders (the segmentation task's
patch loader).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from radflow import conventions as C
from radflow.tables import read_tsv

T = TypeVar("T")
B = TypeVar("B")


class PreprocessedStore:
    """All preprocessed cases of a study, addressed by series_pid."""

    def __init__(self, shard_dirs: Sequence[str | os.PathLike]):
        self._arrays: list[np.ndarray] = []
        frames = []
        for shard_index, shard_dir in enumerate(shard_dirs):
            shard_dir = Path(shard_dir)
            manifest = read_tsv(shard_dir / C.MANIFEST)
            self._arrays.append(np.load(shard_dir / C.PREPROCESSED_ARRAY, mmap_mode="r"))
            manifest["_shard"] = shard_index
            frames.append(manifest)
        self.manifest = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if self.manifest[C.SERIES_PID].duplicated().any():
            raise ValueError("a series_pid appears in two preprocessed shards")
        self._where = {
            pid: (int(s), int(i))
            for pid, s, i in zip(
                self.manifest[C.SERIES_PID],
                self.manifest["_shard"],
                self.manifest["index"],
                strict=True,
            )
        }
        shapes = {a.shape[1:] for a in self._arrays if len(a)}
        if len(shapes) > 1:
            raise ValueError(f"preprocessed shards disagree on case shape: {sorted(shapes)}")
        self.case_shape = shapes.pop() if shapes else None

    def __contains__(self, series_pid: str) -> bool:
        return series_pid in self._where

    def row(self, series_pid: str) -> dict:
        shard, index = self._where[series_pid]
        frame = self.manifest[
            (self.manifest["_shard"] == shard) & (self.manifest["index"] == index)
        ]
        return frame.iloc[0].to_dict()

    def gather(self, series_pids: Sequence[str]) -> np.ndarray:
        """Cases in the given order, as one (N, C, *spatial) array."""
        out = np.empty((len(series_pids), *self.case_shape), dtype=self._arrays[0].dtype)
        for k, pid in enumerate(series_pids):
            shard, index = self._where[pid]
            out[k] = self._arrays[shard][index]
        return out


class VolumeStore:
    """All cases of a study preprocessed in the volumes layout, addressed by series_pid.

    `manifest`: every shard's manifest (radflow.volumes.MANIFEST_COLUMNS) in one table.
    Arrays are opened when asked for, memory-mapped read-only: a training sampler reads
    the patches it draws, not whole volumes.
    """

    def __init__(self, shard_dirs: Sequence[str | os.PathLike]):
        frames = []
        for shard_dir in map(Path, shard_dirs):
            manifest = read_tsv(shard_dir / C.MANIFEST)
            manifest["_dir"] = str(shard_dir)
            frames.append(manifest)
        self.manifest = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(self.manifest) and self.manifest[C.SERIES_PID].duplicated().any():
            raise ValueError("a series_pid appears in two preprocessed shards")
        self._rows = {r[C.SERIES_PID]: r for r in self.manifest.to_dict("records")}
        self._lesions: dict[Path, dict[str, pd.DataFrame]] = {}

    @property
    def cases(self) -> list[str]:
        """Series pseudonyms, in manifest order."""
        return list(self._rows)

    def __contains__(self, series_pid: str) -> bool:
        return series_pid in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, series_pid: str) -> dict:
        """The case's manifest row (its geometry: radflow.geometry.CaseGeometry.from_row)."""
        return {k: v for k, v in self._rows[series_pid].items() if k != "_dir"}

    def image(self, series_pid: str) -> np.ndarray:
        """The case's (C, z, y, x) image, memory-mapped read-only."""
        return np.load(self._path(series_pid, C.IMAGE_ARRAY_SUFFIX), mmap_mode="r")

    def mask(self, series_pid: str) -> np.ndarray | None:
        """The case's (z, y, x) uint8 label map, memory-mapped read-only; None without one."""
        if not self._rows[series_pid]["has_mask"]:
            return None
        return np.load(self._path(series_pid, C.MASK_ARRAY_SUFFIX), mmap_mode="r")

    def label_voxels(self, series_pid: str) -> dict[int, int]:
        """Voxels of each foreground label in the case's preprocessed mask ({} without)."""
        from radflow.volumes import parse_label_voxels

        return parse_label_voxels(self._rows[series_pid]["label_voxels"])

    def lesions(self, series_pid: str) -> pd.DataFrame:
        """The case's lesions in its preprocessed voxels (radflow.lesions
        PREPROCESSED_COLUMNS; none where the shard has no lesions table)."""
        from radflow.lesions import PREPROCESSED_COLUMNS, PREPROCESSED_LESIONS

        shard = self.shard_dir(series_pid)
        if shard not in self._lesions:
            path = shard / PREPROCESSED_LESIONS
            table = read_tsv(path) if path.is_file() else pd.DataFrame(columns=PREPROCESSED_COLUMNS)
            self._lesions[shard] = {pid: g.reset_index(drop=True)
                                    for pid, g in table.groupby(C.SERIES_PID)}  # fmt: skip
        empty = pd.DataFrame(columns=PREPROCESSED_COLUMNS)
        return self._lesions[shard].get(series_pid, empty)

    def shard_dir(self, series_pid: str) -> Path:
        """The preprocessed shard folder holding the case."""
        return Path(self._rows[series_pid]["_dir"])

    def _path(self, series_pid: str, suffix: str) -> Path:
        return self.shard_dir(series_pid) / f"{series_pid}{suffix}"


class BatchIterator:
    """Yields (x, y) torch batches from an indexable array, built ahead in a thread.

    `images` may be an in-memory array or a memory map; `order` is the sequence of row
    indices for one pass (shuffled by the caller for training).
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        order: np.ndarray,
        batch_size: int,
        *,
        pin_memory: bool = False,
        prefetch: int = 2,
        drop_last: bool = False,
    ):
        self.images, self.targets = images, targets
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        self.batches = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
        self.batches = [b for b in self.batches if len(b)]
        self.pin_memory = pin_memory
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.batches)

    def _make(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # sorted reads are sequential in a memory map; the model does not see the order
        rows = np.sort(rows)
        x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        y = torch.from_numpy(np.asarray(self.targets[rows]))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return prefetched(self._make, self.batches, self.prefetch)


def prefetched(make: Callable[[T], B], items: Iterable[T], prefetch: int = 2) -> Iterator[B]:
    """Yield `make(item)` for each of `items` in order, each made ahead in a background
    thread, at most `prefetch` waiting. An error in `make` is raised in the consuming
    thread. Closing the generator early (a `break`) stops the thread after the item it
    is making, so no thread is left blocked on a full queue.

    The thread helps where `make` releases the GIL: numpy slicing and copies from a
    memory map, PyTorch operations.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        try:
            for item in items:
                if stop.is_set() or not put(make(item)):
                    return
        except BaseException as error:  # surface loader errors in the training thread
            put(error)
            return
        put(done)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
