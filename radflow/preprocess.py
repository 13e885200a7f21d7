"""Preprocessing: intensity normalisation by modality and resampling to a fixed grid.

The heuristics are decided here, once, and named (nnU-Net style):

- X-ray projections (DX, CR, MG, ...): clip to the image's own [p_low, p_high]
  percentiles and scale to [0, 1]. Exposure, detector and vendor processing differ per
  image, so there is no absolute scale to keep; percentiles ignore collimator edges and
  burnt-in markers that a min/max would latch onto.
- CT: clip to a Hounsfield window [low, high] and scale to [0, 1]; HU is absolute.
- MR (and other modalities): z-score over the foreground (voxels above a fraction of
  the robust maximum), background set to the foreground minimum; MR intensity has no unit.

Resampling fits the whole image into `target_shape_px` keeping its physical aspect ratio
(non-square pixels are made square), then pads symmetrically with the normalised
background (0 for X-ray/CT). Downsampling is antialiased with a Gaussian prefilter, so
nodule-sized structures average down instead of aliasing. With `target_spacing_mm` the
image is instead resampled to that spacing and centre-cropped or padded to the shape.
Each case's mapping (scale and offset per axis) is recorded so coordinates given in the
original pixel grid (annotations) map exactly onto the preprocessed grid.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from radflow import conventions as C
from radflow.tables import atomic_path, read_tsv

XRAY_MODALITIES = C.PROJECTION_MODALITIES
CT_MODALITIES = frozenset({"CT"})


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings of the preprocessing stage; mirrors config `preprocess:`."""

    target_shape_px: tuple[int, ...] = (128, 128)
    target_spacing_mm: float | None = None
    xray_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window_hu: tuple[float, float] = (-1000.0, 400.0)
    mr_foreground_fraction: float = 0.05
    intensity: str = "auto"  # auto (by modality) | xray | ct | mr | minmax | none
    dtype: str = "float16"

    @classmethod
    def from_config(cls, cfg: dict) -> PreprocessSettings:
        return cls(
            target_shape_px=tuple(int(v) for v in cfg.get("target_shape_px", (128, 128))),
            target_spacing_mm=cfg.get("target_spacing_mm"),
            xray_percentiles=tuple(cfg.get("xray_percentiles", (0.5, 99.5))),
            ct_window_hu=tuple(cfg.get("ct_window_hu", (-1000.0, 400.0))),
            mr_foreground_fraction=float(cfg.get("mr_foreground_fraction", 0.05)),
            intensity=str(cfg.get("intensity", "auto")),
            dtype=cfg.get("dtype", "float16"),
        )


# ------------------------------------------------------------------ intensities
def normalize_xray(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(image, percentiles)
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalize_ct(image: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    lo, hi = window_hu
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def threshold_foreground(image: np.ndarray, foreground_fraction: float) -> np.ndarray:
    """MR foreground: voxels above `foreground_fraction` of the robust maximum (the 99.5th
    percentile), so air and noise stay out without a fixed intensity scale."""
    return image > foreground_fraction * np.percentile(image, 99.5)


def normalize_mr(image: np.ndarray, foreground_fraction: float) -> np.ndarray:
    foreground = threshold_foreground(image, foreground_fraction)
    if foreground.sum() < 2:
        foreground = np.ones_like(image, dtype=bool)
    values = image[foreground]
    z = (image - values.mean()) / (values.std() + 1e-6)
    z[~foreground] = z[foreground].min()
    return z.astype(np.float32)


def normalize_minmax(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


INTENSITY_CHOICES = ("auto", "xray", "ct", "mr", "minmax", "none")


def intensity_scheme(modality: str, settings: PreprocessSettings) -> str:
    """The normalisation applied: config `preprocess.intensity`, or for "auto" the
    modality's (X-ray percentiles, CT window, MR foreground z-score for the rest)."""
    if settings.intensity != "auto":
        return settings.intensity
    if modality in XRAY_MODALITIES:
        return "xray"
    if modality in CT_MODALITIES:
        return "ct"
    return "mr"


def normalize(image: np.ndarray, modality: str, settings: PreprocessSettings) -> np.ndarray:
    """Normalise intensities by modality or by `settings.intensity` (module docstring);
    "minmax" scales the image's own range to [0, 1] (for data shipped already windowed or
    binary, e.g. MedMNIST), "none" keeps the values."""
    scheme = intensity_scheme(modality, settings)
    if scheme == "xray":
        return normalize_xray(image, settings.xray_percentiles)
    if scheme == "ct":
        return normalize_ct(image, settings.ct_window_hu)
    if scheme == "mr":
        return normalize_mr(image, settings.mr_foreground_fraction)
    if scheme == "minmax":
        return normalize_minmax(image)
    if scheme == "none":
        return image.astype(np.float32, copy=False)
    raise ValueError(
        f"preprocess.intensity {scheme!r} is not one of {', '.join(INTENSITY_CHOICES)}"
    )


# ------------------------------------------------------------------- resampling
@dataclass(frozen=True)
class GridMapping:
    """out_index = in_index * scale + offset, per axis (pixel-centre coordinates)."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    out_spacing_mm: tuple[float, ...]

    def to_output(self, coords: Sequence[float]) -> tuple[float, ...]:
        return tuple(c * s + o for c, s, o in zip(coords, self.scale, self.offset, strict=True))


def plan_grid(
    in_shape: Sequence[int],
    in_spacing_mm: Sequence[float],
    target_shape: Sequence[int],
    target_spacing_mm: float | None = None,
) -> GridMapping:
    """How an image of `in_shape` at `in_spacing_mm` maps onto `target_shape`.

    Without a target spacing, the image's physical extent is fitted into the target
    (largest isotropic spacing that fits every axis), centred.
    """
    if len(in_shape) != len(target_shape):
        raise ValueError(
            f"image has {len(in_shape)} axes but target_shape_px has {len(target_shape)}; "
            "set preprocess.target_shape_px to one size per image axis"
        )
    extent = np.asarray(in_shape, float) * np.asarray(in_spacing_mm, float)
    if target_spacing_mm is None:
        out_spacing = float(np.max(extent / np.asarray(target_shape, float)))
    else:
        out_spacing = float(target_spacing_mm)
    scale = np.asarray(in_spacing_mm, float) / out_spacing
    # centre: the middle of the input extent lands on the middle of the output grid
    in_centre = (np.asarray(in_shape, float) - 1) / 2
    out_centre = (np.asarray(target_shape, float) - 1) / 2
    offset = out_centre - in_centre * scale
    return GridMapping(tuple(scale), tuple(offset), (out_spacing,) * len(in_shape))


def resample(
    image: np.ndarray, mapping: GridMapping, target_shape: Sequence[int], fill: float
) -> np.ndarray:
    """Linear resampling onto the output grid, Gaussian-prefiltered when downsampling."""
    scale = np.asarray(mapping.scale)
    # sigma (in input pixels) that suppresses frequencies above the output Nyquist limit
    sigma = np.where(scale < 1, (1 / scale - 1) / 2, 0.0)
    smoothed = ndimage.gaussian_filter(image, sigma, mode="nearest") if sigma.any() else image
    # affine_transform maps output coords o to input coords i = o / scale - offset / scale
    return ndimage.affine_transform(
        smoothed.astype(np.float32, copy=False),
        1 / scale,
        offset=-np.asarray(mapping.offset) / scale,
        output_shape=tuple(target_shape),
        order=1,
        mode="constant",
        cval=fill,
    )


@dataclass
class PreprocessedCase:
    series_pid: str
    array: np.ndarray  # (C, *spatial)
    mapping: GridMapping
    in_shape: tuple[int, ...]
    in_spacing_mm: tuple[float, ...]
    notes: dict = field(default_factory=dict)


def preprocess_image(
    image: np.ndarray,
    spacing_mm: Sequence[float],
    modality: str,
    settings: PreprocessSettings,
    series_pid: str = "",
    *,
    channels: bool = False,
) -> PreprocessedCase:
    """Normalise then resample one image: 2D (rows, cols) or 3D (z, y, x), or with
    `channels` a (C, *spatial) array whose channels are normalised each on its own and
    resampled onto one grid."""
    stack = np.asarray(image, np.float32)
    if not channels:
        stack = stack[None]
    spatial = stack.shape[1:]
    mapping = plan_grid(spatial, spacing_mm, settings.target_shape_px, settings.target_spacing_mm)
    out = np.empty((len(stack), *settings.target_shape_px), settings.dtype)
    for c, channel in enumerate(stack):
        normalised = normalize(channel, modality, settings)
        out[c] = resample(normalised, mapping, settings.target_shape_px, float(normalised.min()))
    return PreprocessedCase(series_pid, out, mapping, tuple(spatial), tuple(spacing_mm))


# ---------------------------------------------------------------------- shards
def _preprocess_one(args: tuple[str, str, str, int, PreprocessSettings]) -> PreprocessedCase:
    from radflow.dicom.nifti import read_channels

    series_pid, path, modality, _n_channels, settings = args
    image, spacing = read_channels(path)  # (C, *spatial)
    if image.ndim == 4 and image.shape[1] == 1 and len(settings.target_shape_px) == 2:
        image, spacing = image[:, 0], spacing[1:]
    return preprocess_image(image, spacing, modality, settings, series_pid, channels=True)


def _dimension_reason(ndim: str, shape: str, wanted_ndim: int) -> str:
    """Why a converted unit of another dimensionality is left out of the study."""
    if str(ndim) == "4":
        volumes = str(shape).split("\\")[-1]
        return (f"4D image ({volumes} volumes: time series, diffusion or multi-phase) in a "
                f"{wanted_ndim}D study: the task needs one {wanted_ndim}D image per unit")  # fmt: skip
    return (f"{ndim}D image in a {wanted_ndim}D study (preprocess.target_shape_px has "
            f"{wanted_ndim} sizes)")  # fmt: skip


def preprocess_shard(
    nifti_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PreprocessSettings,
    *,
    threads: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Preprocess every converted image of one shard into a memory-mappable array.

    Input: `nifti_dir`, the convert stage's shard folder (its manifest lists the units
    converted ok; each unit's sidecar gives its modality).
    Outputs, in `out_dir`: `images.npy` of shape (N, C, *target_shape_px) (C: the units' channels, 1 for DICOM),
    `manifest.tsv` (series_pid, index, in_shape, in_spacing_mm, scale, offset,
    out_spacing_mm), rows in array order, and `skipped.tsv` (series_pid, reason) for
    converted units whose dimensionality is not the study's. Returns the manifest.
    """
    nifti_dir, out_dir = Path(nifti_dir), Path(out_dir)
    converted = read_tsv(nifti_dir / C.MANIFEST, text=True)
    converted = converted[converted["status"] == "ok"].sort_values(C.SERIES_PID)
    # A study has one image dimensionality (len(target_shape_px)); a unit of another
    # (a CT volume in a radiograph study, a single-slice volume in a 3D study) is left out
    # with its reason rather than failing the shard.
    wanted_ndim = len(settings.target_shape_px)
    unit_ndim = pd.to_numeric(converted["ndim"], errors="coerce")
    wrong = converted[unit_ndim != wanted_ndim]
    skipped = pd.DataFrame(
        {
            C.SERIES_PID: wrong[C.SERIES_PID],
            C.REASON: [
                _dimension_reason(n, shape, wanted_ndim)
                for n, shape in zip(wrong["ndim"], wrong["shape"], strict=True)
            ],
        },
        columns=[C.SERIES_PID, C.REASON],
    )
    converted = converted[unit_ndim == wanted_ndim]
    jobs = []
    for pid in converted[C.SERIES_PID]:
        sidecar = _sidecar(nifti_dir, pid)
        n_channels = int(sidecar.get("n_channels", 1))
        jobs.append((pid, str(nifti_dir / f"{pid}{C.NIFTI_SUFFIX}"),
                     str(sidecar.get("Modality", "")), n_channels, settings))  # fmt: skip
    # A study has one channel count (an images table's channels; 1 for DICOM).
    counts = pd.Series([job[3] for job in jobs], dtype=int)
    n_channels = int(counts.mode().min()) if len(counts) else 1
    odd = [job for job in jobs if job[3] != n_channels]
    if odd:
        extra = pd.DataFrame(
            {
                C.SERIES_PID: [job[0] for job in odd],
                C.REASON: [
                    f"{job[3]} channels where the study's units have {n_channels}" for job in odd
                ],
            }  # fmt: skip
        )
        skipped = pd.concat([skipped, extra], ignore_index=True)
        jobs = [job for job in jobs if job[3] == n_channels]
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(jobs), n_channels, *settings.target_shape_px)
    columns = [C.SERIES_PID, "index", "in_shape", "in_spacing_mm", "scale", "offset",
               "out_spacing_mm"]  # fmt: skip
    # The manifest is renamed last: a shard folder with a manifest is complete.
    with (
        atomic_path(out_dir / C.MANIFEST) as tmp_manifest,
        atomic_path(out_dir / C.SKIPPED_TABLE) as tmp_skipped,
        atomic_path(out_dir / C.PREPROCESSED_ARRAY) as tmp_array,
    ):
        array = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=settings.dtype,
                                          shape=shape)  # fmt: skip
        rows = []
        results = map_jobs(_preprocess_one, jobs, threads)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="preprocess", unit="image",
                           mininterval=2)  # fmt: skip
        for index, case in enumerate(results):
            array[index] = case.array
            rows.append(
                {
                    C.SERIES_PID: case.series_pid,
                    "index": index,
                    "in_shape": _fmt(case.in_shape),
                    "in_spacing_mm": _fmt(case.in_spacing_mm),
                    "scale": _fmt(case.mapping.scale),
                    "offset": _fmt(case.mapping.offset),
                    "out_spacing_mm": _fmt(case.mapping.out_spacing_mm),
                }
            )
        array.flush()
        del array
        manifest = pd.DataFrame(rows, columns=columns)
        manifest.to_csv(tmp_manifest, sep="\t", index=False)
        skipped.to_csv(tmp_skipped, sep="\t", index=False)
    if len(skipped):
        print(f"preprocess: left out {len(skipped)} unit(s) of another dimensionality or "
              f"channel count (listed in {C.SKIPPED_TABLE})", file=sys.stderr)  # fmt: skip
    return manifest


def _sidecar(nifti_dir: Path, series_pid: str) -> dict:
    return json.loads((nifti_dir / f"{series_pid}{C.SIDECAR_SUFFIX}").read_text())


def mapping_from_row(row: dict) -> GridMapping:
    """The GridMapping recorded in a preprocess manifest row."""
    return GridMapping(_parse(row["scale"]), _parse(row["offset"]), _parse(row["out_spacing_mm"]))


def map_jobs(fn, jobs, threads):
    """`fn` over `jobs` in order, on `threads` processes where there is more than one."""
    if threads > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(max_workers=threads)
        try:
            yield from pool.map(fn, jobs, chunksize=max(1, len(jobs) // (threads * 8)))
        finally:
            pool.shutdown()
    else:
        yield from map(fn, jobs)


def _fmt(values: Sequence[float]) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


def _parse(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split("\\"))


def settings_dict(settings: PreprocessSettings) -> dict:
    return asdict(settings)
