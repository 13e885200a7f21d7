"""Training patches for segmentation: where to cut them, reading them, a loader.

nnU-Net's patch sampling, as plain functions over cases held as arrays:

* `SegmentationCase`: one case's image (C, *spatial) (an in-memory array or a numpy
  memory map, float16 allowed), label map (*spatial) (uint8), the precomputed voxel
  coordinates of each foreground class (`foreground_locations`, nnU-Net's
  class_locations) and the value that pads each image channel outside the volume;
* `draw_patches`: where the patches of one batch lie. Each patch comes from a case drawn
  uniformly; with probability `oversample_foreground` (1/3, as nnU-Net) it holds a
  voxel drawn uniformly among the voxels of one foreground class, the class drawn
  uniformly among those present in the case; otherwise its position is uniform over
  the volume;
* `read_patch`: one window of a case, as float32 image and int64 label, padded where it
  leaves the volume. Only the window is read, so a memory-mapped case costs about the
  patch's bytes, whatever the volume's size;
* `sample_batch`: both, for a batch: (N, C, *patch) float32 and (N, *patch) int64;
* `PatchLoader`: a fixed number of batches per epoch, made and augmented ahead in a
  background thread (`radflow.data.prefetched`).

Where a patch lies. A random patch's corner is uniform over the positions that keep it
inside the volume; a foreground patch is centred on its voxel and then shifted, where
needed, to lie inside the volume (so it contains the voxel, near the centre unless the
voxel is near the border: nnU-Net's rule when it pads nothing for its spatial
augmentation). Along an axis where the volume is smaller than the patch, the patch
overhangs both ends and is padded: the whole extent of the volume is in the patch, at a
uniform offset in a random patch, as near the centre as that allows for the voxel of a
foreground one.

Padding. Image channels take `SegmentationCase.background` outside the volume: 0 by
default, the background of images z-scored within a brain mask with the outside set to
0 (nnU-Net's scheme for BraTS-like MRI); for other images the per-channel minimum
(`channel_minimum`, computed once per case while preprocessing: it reads the whole
image). Labels take `label_pad`: 0 (background), or an ignore index that the loss
(`loss.dice_ce_loss(ignore_index=...)`) leaves out.

Deviation from nnU-Net: nnU-Net fixes the number of foreground patches per batch
(the last round(N * 1/3) of a batch, at least one: a batch of two has one, so 1/2 of
all patches); here each patch is foreground with probability `oversample_foreground`,
so the fraction is what it says at any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from radflow.data import prefetched
from radflow.tasks.segmentation.augment import (
    SegmentationAugmentSettings,
    augment_segmentation_batch,
)

__all__ = [
    "PatchData",
    "PatchDraw",
    "PatchLoader",
    "PatchTrainingData",
    "SegmentationCase",
    "channel_minimum",
    "draw_patches",
    "foreground_locations",
    "read_patch",
    "sample_batch",
]

MAX_LOCATIONS_PER_CLASS = 10_000  # nnU-Net's class_locations
MIN_LOCATION_FRACTION = 0.01  # ... and at least 1% of a class's voxels


@dataclass(frozen=True)
class SegmentationCase:
    """One case for patch sampling.

    image: (C, *spatial), any float dtype, a memory map allowed (only patches are read).
    label: (*spatial) integer label map (uint8), the image's grid.
    class_locations: {class: (n, spatial_dims) int array of voxel coordinates}, from
        `foreground_locations`; classes with no voxels may be absent or empty.
    background: the value outside the volume, one for all channels or one per channel.
    """

    image: np.ndarray
    label: np.ndarray
    class_locations: Mapping[int, np.ndarray] = field(default_factory=dict)
    background: float | Sequence[float] = 0.0

    def __post_init__(self):
        if self.label.shape != self.image.shape[1:]:
            raise ValueError(
                f"label {self.label.shape} must be the image's {self.image.shape} "
                "without the channel axis"
            )


class PatchDraw(NamedTuple):
    """Where one patch lies: the case's index, the lower corner of the window in voxels
    (negative or past the end where it overhangs), and the foreground class it was
    drawn to contain (None: a random patch)."""

    case: int
    lower: tuple[int, ...]
    foreground_class: int | None


def foreground_locations(
    label: np.ndarray,
    *,
    seed: int = 0,
    max_per_class: int = MAX_LOCATIONS_PER_CLASS,
    min_fraction: float = MIN_LOCATION_FRACTION,
) -> dict[int, np.ndarray]:
    """Voxel coordinates of each foreground class (label > 0) of a label map, subsampled
    as nnU-Net's class_locations: of a class with n voxels, max(min(max_per_class, n),
    ceil(min_fraction * n)) drawn without replacement (seeded). Returns {class: (k, dims)
    int32 array}, for the classes present. One pass over the label map: cheap enough
    for the preprocessing stage to store with each case."""
    flat = np.flatnonzero(np.asarray(label))
    if not len(flat):
        return {}
    values = np.asarray(label).reshape(-1)[flat]
    rng = np.random.default_rng(seed)
    order = np.argsort(values, kind="stable")
    flat, values = flat[order], values[order]
    classes, starts = np.unique(values, return_index=True)
    locations = {}
    for cls, voxels in zip(classes, np.split(flat, starts[1:]), strict=True):
        keep = max(min(max_per_class, len(voxels)), math.ceil(min_fraction * len(voxels)))
        if keep < len(voxels):
            voxels = np.sort(rng.choice(voxels, keep, replace=False))
        coords = np.stack(np.unravel_index(voxels, label.shape), axis=1).astype(np.int32)
        locations[int(cls)] = coords
    return locations


def channel_minimum(image: np.ndarray) -> np.ndarray:
    """Each channel's minimum (C,) as float32, the padding value of images that are not
    zero-background. Reads the whole image: compute it once per case."""
    return np.asarray(image).reshape(image.shape[0], -1).min(axis=1).astype(np.float32)


def _random_lower(shape, patch_size, rng) -> tuple[int, ...]:
    """A uniform corner keeping the patch inside (or, where the volume is smaller,
    around) the volume along each axis."""
    return tuple(
        int(rng.integers(min(0, s - p), max(0, s - p) + 1))
        for s, p in zip(shape, patch_size, strict=True)
    )


def _lower_around(voxel, shape, patch_size) -> tuple[int, ...]:
    """The corner centring `voxel`, shifted as little as keeps the patch inside the
    volume (or, along an axis where the volume is smaller, the volume inside the
    patch); either way the voxel stays inside the patch."""
    return tuple(
        int(np.clip(v - p // 2, min(0, s - p), max(0, s - p)))
        for v, s, p in zip(voxel, shape, patch_size, strict=True)
    )


def draw_patches(
    cases: Sequence[SegmentationCase],
    patch_size: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    oversample_foreground: float = 1 / 3,
) -> list[PatchDraw]:
    """Where the `batch_size` patches of one batch lie (see the module doc)."""
    patch_size = tuple(int(p) for p in patch_size)
    draws = []
    for _ in range(batch_size):
        index = int(rng.integers(len(cases)))
        case = cases[index]
        shape = case.label.shape
        if len(patch_size) != len(shape):
            raise ValueError(f"patch size {patch_size} for a {len(shape)}D volume {shape}")
        foreground = rng.random() < oversample_foreground
        present = sorted(c for c, coords in case.class_locations.items() if len(coords))
        if foreground and present:  # a case without foreground gets a random patch
            cls = present[int(rng.integers(len(present)))]
            coords = case.class_locations[cls]
            voxel = coords[int(rng.integers(len(coords)))]
            draws.append(PatchDraw(index, _lower_around(voxel, shape, patch_size), cls))
        else:
            draws.append(PatchDraw(index, _random_lower(shape, patch_size, rng), None))
    return draws


def read_patch(
    case: SegmentationCase,
    lower: Sequence[int],
    patch_size: Sequence[int],
    *,
    label_pad: int = 0,
    out_image: np.ndarray | None = None,
    out_label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The window [lower, lower + patch_size) of a case: image (C, *patch) float32 and
    label (*patch) int64, padded with `case.background` and `label_pad` where the window
    leaves the volume. Reads only the window (from a memory map: only its pages).
    `out_image`, `out_label`: arrays to fill instead of new ones."""
    shape = case.label.shape
    channels = case.image.shape[0]
    if out_image is None:
        out_image = np.empty((channels, *patch_size), dtype=np.float32)
    if out_label is None:
        out_label = np.empty(tuple(patch_size), dtype=np.int64)
    source, target = [], []
    for low, p, s in zip(lower, patch_size, shape, strict=True):
        start, stop = max(low, 0), min(low + p, s)
        source.append(slice(start, max(start, stop)))
        target.append(slice(start - low, start - low + max(0, stop - start)))
    background = np.broadcast_to(np.asarray(case.background, dtype=np.float32), (channels,))
    out_image[...] = background.reshape((channels,) + (1,) * len(shape))
    out_label[...] = label_pad
    out_image[(slice(None), *target)] = case.image[(slice(None), *source)]
    out_label[tuple(target)] = case.label[tuple(source)]
    return out_image, out_label


def sample_batch(
    cases: Sequence[SegmentationCase],
    patch_size: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    oversample_foreground: float = 1 / 3,
    label_pad: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One training batch: images (N, C, *patch) float32 and labels (N, *patch) int64.
    Memory: the batch's arrays, whatever the size of the volumes."""
    patch_size = tuple(int(p) for p in patch_size)
    channels = cases[0].image.shape[0]
    images = np.empty((batch_size, channels, *patch_size), dtype=np.float32)
    labels = np.empty((batch_size, *patch_size), dtype=np.int64)
    draws = draw_patches(
        cases, patch_size, batch_size, rng, oversample_foreground=oversample_foreground
    )
    for k, draw in enumerate(draws):
        read_patch(
            cases[draw.case],
            draw.lower,
            patch_size,
            label_pad=label_pad,
            out_image=images[k],
            out_label=labels[k],
        )
    return images, labels


class PatchLoader:
    """Training batches of patches, `iterations_per_epoch` per pass, each sampled
    (`sample_batch`) and augmented (`augment_segmentation_batch`, on the CPU) ahead in a
    background thread. Yields (images (N, C, *patch) float32, labels (N, *patch) int64)
    torch tensors, pinned for an asynchronous copy with `pin_memory` (CUDA).

    Reproducible: pass e of the loader (counted from 0) draws its patches from
    `np.random.default_rng([seed, e])` and its augmentation from a torch generator
    seeded likewise, whatever happened in earlier passes (one stopped early included).
    `augment=None` or a disabled settings object: no augmentation.
    """

    def __init__(
        self,
        cases: Sequence[SegmentationCase],
        patch_size: Sequence[int],
        batch_size: int,
        iterations_per_epoch: int,
        *,
        seed: int,
        oversample_foreground: float = 1 / 3,
        label_pad: int = 0,
        augment: SegmentationAugmentSettings | None = None,
        pin_memory: bool = False,
        prefetch: int = 2,
    ):
        if not cases:
            raise ValueError("PatchLoader needs at least one case")
        channels = {case.image.shape[0] for case in cases}
        if len(channels) > 1:
            raise ValueError(f"cases disagree on the number of channels: {sorted(channels)}")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.iterations_per_epoch = iterations_per_epoch
        self.seed = seed
        self.oversample_foreground = oversample_foreground
        self.label_pad = label_pad
        self.augment = augment
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.epoch = 0

    def __len__(self) -> int:
        return self.iterations_per_epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        self.epoch += 1

        def make(_) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = sample_batch(
                self.cases,
                self.patch_size,
                self.batch_size,
                rng,
                oversample_foreground=self.oversample_foreground,
                label_pad=self.label_pad,
            )
            x, y = torch.from_numpy(images), torch.from_numpy(labels)
            if self.augment is not None:
                x, y = augment_segmentation_batch(x, y, self.augment, generator)
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            return x, y

        return prefetched(make, range(self.iterations_per_epoch), self.prefetch)


class PatchTrainingData:
    """`radflow.train.fit`'s data (its docstring has the protocol) over patches: training
    batches from `PatchLoader` over `train_cases` (augmented in its thread), validation
    on `validation_patches` fixed patches per validation case, half of them on
    foreground, drawn once from the seed. Tasks of the volumes layout subclass it
    (segmentation maps label values to classes in `augment`; localisation uses it as is).

    `settings`: the task's settings with `patch_size`, `iterations_per_epoch`,
    `validation_patches` and `augment_settings()`; `oversample`: the loader's share of
    foreground patches."""

    def __init__(self, train_cases: Sequence[SegmentationCase],
                 val_cases: Sequence[SegmentationCase], train_settings, settings,
                 oversample: float):  # fmt: skip
        self.settings = settings
        self.train_settings = train_settings
        self.oversample = oversample
        self.train_cases = list(train_cases)
        self.in_channels = self.train_cases[0].image.shape[0]
        self.spatial_dims = self.train_cases[0].image.ndim - 1
        rng = np.random.default_rng([train_settings.seed, 1])
        self.val_images, self.val_targets = sample_batch(
            val_cases, settings.patch_size, settings.validation_patches * len(val_cases), rng,
            oversample_foreground=0.5,
        )  # fmt: skip
        self.loader = None

    def prepare(self, model, device) -> None:
        self.loader = PatchLoader(
            self.train_cases,
            self.settings.patch_size,
            self.train_settings.batch_size,
            self.settings.iterations_per_epoch,
            seed=self.train_settings.seed,
            oversample_foreground=self.oversample,
            augment=self.settings.augment_settings(),
            pin_memory=device.type == "cuda",
        )

    def steps_per_epoch(self) -> int:
        return self.settings.iterations_per_epoch

    def epoch_batches(self):
        return iter(self.loader)

    def augment(self, x, y):
        return x, y  # augmented in the loader's thread

    def validation(self):
        return self.val_images, self.val_targets


class PatchData(PatchTrainingData):
    """Segmentation's training data: patches of the cases' images and masks, the mask
    values mapped to class indices on the device (`SegmentationSettings.class_of_value`)."""

    @classmethod
    def from_store(cls, store, train_pids, val_pids, train_settings, settings) -> PatchData:
        def case(pid: str) -> SegmentationCase:
            image, mask = store.image(pid), store.mask(pid)
            return SegmentationCase(
                image, mask, foreground_locations(mask), background=channel_minimum(image)
            )

        data = cls([case(pid) for pid in train_pids], [case(pid) for pid in val_pids],
                   train_settings, settings, settings.oversample_foreground)  # fmt: skip
        data.lut_np = settings.class_of_value()
        data.val_targets = data.lut_np[data.val_targets]
        data.lut = None
        return data

    def prepare(self, model, device) -> None:
        super().prepare(model, device)
        self.lut = torch.as_tensor(self.lut_np, device=device)

    def augment(self, x, y):
        # augmented in the loader's thread; here only the label values become classes
        return x, self.lut[y]
