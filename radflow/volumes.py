"""Preprocessing of the volumes layout (segmentation, localisation): nnU-Net's way.

Each case keeps its own shape. In order, per case (one at a time per worker process):

1. read the converted NIfTI (channels on the 4th axis) and `<pid>_mask.nii.gz` if any;
2. reorient to the closest canonical axes (permutation and flips only, no interpolation:
   radflow.geometry), so array axes (z, y, x) mean the same anatomy for axial, sagittal
   and oblique acquisitions;
3. crop to the foreground's bounding box (plus config `crop_margin_mm`; every mask
   voxel kept). The foreground (`foreground_mask`): CT, voxels above
   `ct_foreground_hu` (body, not air); other modalities, voxels that differ from a
   constant background (a value that at least half the border voxels hold and almost
   no voxel lies below: nnU-Net's "nonzero" where it is 0, and z-scored data shipped
   with a constant background such as BraTS), or where there is none, voxels above
   `mr_foreground_fraction` of the robust maximum; the union over channels, holes
   filled;
4. normalise each channel on its own (config `intensity`, radflow.preprocess): MR and
   other modalities z-scored over the foreground, background set to 0 (nnU-Net's
   ZScoreNormalization with the nonzero mask); CT clipped to `ct_window_hu` and scaled
   to [0, 1]; xray, minmax, none as in the grid layout;
5. resample to the plan's target spacing (plan.json, radflow.plan), edge-aligned:
   images linearly (or cubic B-spline, `image_interpolation`), Gaussian-prefiltered
   along downsampled axes; the mask label by label (one-hot, linear, argmax), or
   nearest (`mask_interpolation`).

The order (crop, normalise, resample) is nnU-Net's: statistics come from the native
voxels, and only the box is resampled. Outputs per shard: `<pid>_image.npy` (C, z, y, x)
in `dtype`, `<pid>_mask.npy` (z, y, x) uint8 where the case has a mask, `manifest.tsv`
(one row per case: everything radflow.geometry needs to invert, label voxel counts,
foreground statistics) and `skipped.tsv`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from radflow import conventions as C
from radflow.config import schema_defaults
from radflow.geometry import (
    LABEL_METHODS,
    CaseGeometry,
    bounding_box,
    canonical_spacing_mm,
    reorient_to_canonical,
    resample_image,
    resample_labels,
)
from radflow.preprocess import intensity_scheme, map_jobs, normalize, threshold_foreground
from radflow.tables import atomic_path, read_tsv, write_tsv

_DEFAULTS = schema_defaults("preprocess")  # config/schema.yaml holds every default
#: Orders of scipy's spline interpolation by config `preprocess.image_interpolation`.
IMAGE_ORDERS = {"linear": 1, "cubic": 3}
#: A value shared by at least this fraction of the border voxels is a constant background.
BACKGROUND_BORDER_FRACTION = 0.5
#: ... and at most this fraction of all voxels lies below it (a background is the bottom).
BACKGROUND_BELOW_FRACTION = 0.01


@dataclass(frozen=True)
class VolumeSettings:
    """Config `preprocess:` keys of the volumes layout (defaults: config/schema.yaml); the
    target spacing comes from the plan (radflow.plan)."""

    intensity: str = _DEFAULTS["intensity"]
    ct_window_hu: tuple[float, float] = _DEFAULTS["ct_window_hu"]
    xray_percentiles: tuple[float, float] = _DEFAULTS["xray_percentiles"]
    mr_foreground_fraction: float = _DEFAULTS["mr_foreground_fraction"]
    ct_foreground_hu: float = _DEFAULTS["ct_foreground_hu"]
    crop_margin_mm: float = _DEFAULTS["crop_margin_mm"]
    image_interpolation: str = _DEFAULTS["image_interpolation"]
    mask_interpolation: str = _DEFAULTS["mask_interpolation"]
    dtype: str = _DEFAULTS["dtype"]

    @classmethod
    def from_config(cls, cfg: dict) -> VolumeSettings:
        """From config `preprocess:` (keys of the grid layout are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in cfg.items() if k in known})  # fmt: skip


# ------------------------------------------------------------------- foreground
def constant_background(channel: np.ndarray) -> float | None:
    """A padded or masked background: the value held by at least
    BACKGROUND_BORDER_FRACTION of the voxels on the volume's six faces, provided at most
    BACKGROUND_BELOW_FRACTION of all voxels lie below it (0 of a skull-stripped MR, the
    constant of a z-scored one, CT padding; not a bright object touching the border).
    None where the border varies (noise, tissue)."""
    faces = np.concatenate([channel[[0, -1]].ravel(), channel[:, [0, -1]].ravel(),
                            channel[:, :, [0, -1]].ravel()])  # fmt: skip
    values, counts = np.unique(faces, return_counts=True)
    top = int(np.argmax(counts))
    value = values[top]
    if counts[top] < BACKGROUND_BORDER_FRACTION * faces.size:
        return None
    if np.count_nonzero(channel < value) > BACKGROUND_BELOW_FRACTION * channel.size:
        return None
    return float(value)


def foreground_mask(image: np.ndarray, scheme: str, settings: VolumeSettings) -> np.ndarray:
    """Foreground (z, y, x) of a (C, z, y, x) image: the union over channels, holes
    filled (module docstring, step 3). All voxels where no channel has any."""
    foreground = np.zeros(image.shape[1:], bool)
    for channel in image:
        if scheme == "ct":
            foreground |= channel > settings.ct_foreground_hu
            continue
        background = constant_background(channel)
        if background is None:
            foreground |= threshold_foreground(channel, settings.mr_foreground_fraction)
        else:
            foreground |= channel != background
    if not foreground.any():
        return np.ones_like(foreground)
    # holes are filled inside the bounding box only: the same result (what lies outside
    # the box is connected background), in a fraction of the time
    start, stop = bounding_box(foreground, (0, 0, 0))
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    foreground[box] = ndimage.binary_fill_holes(foreground[box])
    return foreground


def zscore_foreground(
    channel: np.ndarray, foreground: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """(z-scored channel, mean, std): mean 0 and standard deviation 1 over the foreground,
    background set to 0 (nnU-Net's ZScoreNormalization with its nonzero mask)."""
    mean, std = _mean_std(channel[foreground])
    out = ((channel - mean) / max(std, 1e-8)).astype(np.float32)
    out[~foreground] = 0.0
    return out, mean, std


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))


# ------------------------------------------------------------------------ a case
@dataclass
class PreprocessedVolume:
    image: np.ndarray  # (C, z, y, x), settings.dtype
    mask: np.ndarray | None  # (z, y, x) uint8
    geometry: CaseGeometry
    scheme: str  # the intensity normalisation applied
    foreground_mean: tuple[float, ...]  # per channel, native intensities, over the foreground
    foreground_std: tuple[float, ...]

    def label_voxels(self) -> dict[int, int]:
        """Voxels of each foreground label (> 0) in the preprocessed mask."""
        if self.mask is None:
            return {}
        counts = np.bincount(self.mask.ravel())
        return {label: int(n) for label, n in enumerate(counts) if label and n}


def preprocess_volume(
    image: np.ndarray,
    affine: np.ndarray,
    modality: str,
    target_spacing_mm: Sequence[float],
    settings: VolumeSettings,
    mask: np.ndarray | None = None,
) -> PreprocessedVolume:
    """One case through steps 2-5 of the module docstring. `image`: (i, j, k) or
    (i, j, k, C) as nibabel reads a converted NIfTI, with its RAS `affine`; `mask`: the
    label map (i, j, k) on the same grid, or None; `target_spacing_mm`: (z, y, x)."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., None]
    native_shape = image.shape[:3]
    canonical = np.ascontiguousarray(reorient_to_canonical(image, affine))  # (C, z, y, x)
    if mask is not None:
        if mask.shape[:3] != native_shape:
            raise ValueError(f"mask of shape {mask.shape}, image {native_shape}: not one grid")
        mask = reorient_to_canonical(np.asarray(mask).reshape(native_shape), affine)
    scheme = intensity_scheme(modality, settings)
    foreground = foreground_mask(canonical, scheme, settings)
    spacing = np.asarray(canonical_spacing_mm(affine))
    margin = [math.ceil(settings.crop_margin_mm / s - 1e-9) for s in spacing]
    keep = foreground if mask is None else foreground | (mask > 0)
    start, stop = bounding_box(keep, margin)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    foreground = foreground[box]
    crop_shape = np.subtract(stop, start)
    out_shape = tuple(int(n) for n in np.maximum(
        1, np.round(crop_shape * spacing / np.asarray(target_spacing_mm, float))))  # fmt: skip
    order = IMAGE_ORDERS[settings.image_interpolation]
    out = np.empty((len(canonical), *out_shape), settings.dtype)
    means, stds = [], []
    for c, channel in enumerate(canonical[(slice(None), *box)]):
        if scheme == "mr":
            normalised, mean, std = zscore_foreground(channel, foreground)
        else:
            normalised = normalize(channel, modality, settings)
            mean, std = _mean_std(channel[foreground])
        out[c] = resample_image(normalised, out_shape, order=order)
        means.append(mean)
        stds.append(std)
    if mask is not None:
        if mask.max(initial=0) > 255:
            raise ValueError(f"mask label {int(mask.max())}: labels up to 255 are stored")
        mask = resample_labels(np.ascontiguousarray(mask[box], np.uint8), out_shape,
                               method=settings.mask_interpolation)  # fmt: skip
    geometry = CaseGeometry(native_shape, np.asarray(affine, float), start, stop, out_shape)
    return PreprocessedVolume(out, mask, geometry, scheme, tuple(means), tuple(stds))


# ------------------------------------------------------------------------ a shard
MANIFEST_COLUMNS = [
    C.SERIES_PID, C.MODALITY, "n_channels", "intensity", "native_shape", "native_affine",
    "native_axcodes", "canonical_shape", "canonical_spacing_mm", "crop_start", "crop_stop",
    "resampled_shape", "target_spacing_mm", "resampled_spacing_mm", "preprocessed_affine",
    "has_mask", "label_voxels", "foreground_mean", "foreground_std",
]  # fmt: skip


def _preprocess_case(
    series_pid: str,
    *,
    nifti_dir: str,
    out_dir: str,
    target_spacing_mm: tuple[float, ...],
    settings: VolumeSettings,
) -> dict:
    """Preprocess one converted case and write its arrays; returns its manifest row."""
    import nibabel as nib

    nifti_dir, out_dir = Path(nifti_dir), Path(out_dir)
    sidecar = json.loads((nifti_dir / f"{series_pid}{C.SIDECAR_SUFFIX}").read_text())
    image = nib.load(nifti_dir / f"{series_pid}{C.NIFTI_SUFFIX}")
    data = np.asarray(image.get_fdata(dtype=np.float32))
    data = data.reshape(*data.shape[:3], -1)
    mask_path = nifti_dir / f"{series_pid}{C.MASK_SUFFIX}"
    mask = np.asarray(nib.load(mask_path).dataobj) if mask_path.exists() else None
    modality = str(sidecar.get("Modality", ""))
    case = preprocess_volume(data, image.affine, modality, target_spacing_mm, settings, mask)
    del data, mask
    _save(out_dir / f"{series_pid}{C.IMAGE_ARRAY_SUFFIX}", case.image)
    if case.mask is not None:
        _save(out_dir / f"{series_pid}{C.MASK_ARRAY_SUFFIX}", case.mask)
    return {
        C.SERIES_PID: series_pid,
        C.MODALITY: modality,
        "n_channels": len(case.image),
        "intensity": case.scheme,
        **case.geometry.to_row(),
        "target_spacing_mm": "\\".join(f"{v:.6g}" for v in target_spacing_mm),
        "has_mask": case.mask is not None,
        "label_voxels": format_label_voxels(case.label_voxels()),
        "foreground_mean": "\\".join(f"{v:.6g}" for v in case.foreground_mean),
        "foreground_std": "\\".join(f"{v:.6g}" for v in case.foreground_std),
    }


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def format_label_voxels(counts: dict[int, int]) -> str:
    """Voxels per foreground label as text, e.g. "1:2031\\2:577" (manifest column
    label_voxels)."""
    return "\\".join(f"{label}:{n}" for label, n in sorted(counts.items()))


def parse_label_voxels(text: str) -> dict[int, int]:
    """The inverse of `format_label_voxels` ("" gives {})."""
    pairs = (item.split(":") for item in str(text).split("\\") if item)
    return {int(label): int(n) for label, n in pairs}


def preprocess_volumes_shard(
    nifti_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    plan: dict,
    settings: VolumeSettings,
    *,
    threads: int = 1,
    progress: bool = True,
    lesions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Preprocess every converted 3D case of one shard (module docstring) at the plan's
    target spacing, on `threads` processes (one case at a time each). Cases that are
    not 3D, or whose channel count is not the plan's, are listed in `skipped.tsv` with
    the reason. `lesions` (radflow.lesions.read_index_lesions: centres in world mm):
    carried into each case's preprocessed voxels, `lesions.tsv`. Writes the arrays, then
    `skipped.tsv` (and `lesions.tsv`) and last `manifest.tsv` (a shard folder with a
    manifest is complete); returns the manifest."""
    nifti_dir, out_dir = Path(nifti_dir), Path(out_dir)
    if settings.image_interpolation not in IMAGE_ORDERS:
        raise ValueError(f"preprocess.image_interpolation {settings.image_interpolation!r} "
                         f"is not one of {', '.join(IMAGE_ORDERS)}")  # fmt: skip
    if settings.mask_interpolation not in LABEL_METHODS:
        raise ValueError(f"preprocess.mask_interpolation {settings.mask_interpolation!r} "
                         f"is not one of {', '.join(LABEL_METHODS)}")  # fmt: skip
    converted = read_tsv(nifti_dir / C.MANIFEST, text=True)
    converted = converted[converted[C.STATUS] == C.STATUS_OK].sort_values(C.SERIES_PID)
    n_channels = int(plan["n_channels"])
    jobs, skipped = [], []
    for pid, ndim in zip(converted[C.SERIES_PID], converted["ndim"], strict=True):
        sidecar = json.loads((nifti_dir / f"{pid}{C.SIDECAR_SUFFIX}").read_text())
        channels = int(sidecar.get("n_channels", 1))
        if ndim != "3":
            skipped.append((pid, f"{ndim}D image: the volumes layout takes 3D images only"))
        elif channels != n_channels:
            skipped.append((pid, f"{channels} channels where the plan's cases have {n_channels}"))
        else:
            jobs.append(pid)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = partial(_preprocess_case, nifti_dir=str(nifti_dir), out_dir=str(out_dir),
                   target_spacing_mm=tuple(plan["target_spacing_mm"]), settings=settings)  # fmt: skip
    results = map_jobs(work, jobs, threads)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(jobs), desc="preprocess", unit="case", mininterval=2)
    manifest = pd.DataFrame(list(results), columns=MANIFEST_COLUMNS)
    write_tsv(pd.DataFrame(skipped, columns=[C.SERIES_PID, C.REASON]), out_dir / C.SKIPPED_TABLE)
    if lesions is not None:
        from radflow.lesions import PREPROCESSED_LESIONS, lesions_in_preprocessed

        write_tsv(lesions_in_preprocessed(manifest, lesions), out_dir / PREPROCESSED_LESIONS)
    write_tsv(manifest, out_dir / C.MANIFEST)
    if skipped:
        print(f"preprocess: left out {len(skipped)} unit(s) (listed in {C.SKIPPED_TABLE})",
              file=sys.stderr)  # fmt: skip
    return manifest
