"""A case on one grid: channels on the reference channel's grid, a label map beside them.

Both inputs that make multi-channel cases use this one module: an images table's cases
(`radflow.images`) and multi-series DICOM cases (`radflow.dicom.case_convert`). A case is
written as the convert stage's other units are, plus what segmentation needs:

- `<pid>.nii.gz`: the channels stacked on the 4th NIfTI axis, in channel order, on the
  reference channel's grid; the other channels are resampled onto it (linear). One
  channel: a plain 3D image.
- `<pid>_mask.nii.gz`: a label map (uint8, uint16 above 255) on the same grid. A mask on
  the same grid is copied voxel for voxel; a mask on another grid is resampled by nearest
  neighbour through world coordinates, after checking that every foreground voxel lies
  inside the image (`REASON_MASK_OUTSIDE` otherwise: a misregistered or misjoined mask
  must fail its case, not be clipped silently; so must a label that vanishes).
- `<pid>.json`: a PHI-free sidecar (the caller's fields; channel names, n_channels,
  channels_resampled, has_mask and the mask's notes).

Geometry follows ITK (SimpleITK images: LPS world millimetres, index (x, y, z), arrays
(z, y, x)); NIfTI files store RAS, `ras_affine` converts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Grids closer than this are the same grid: spacing and origin in mm, direction cosines.
SPACING_TOL_MM, ORIGIN_TOL_MM, DIRECTION_TOL = 0.01, 0.01, 1e-3
#: A foreground voxel whose centre maps this many voxels beyond the image's edge is outside.
INSIDE_TOL_VOXELS = 1e-3

REASON_MASK_OUTSIDE = "mask outside the image"
REASON_MASK_LABEL_LOST = "mask label lost on the image's grid"
REASON_MASK_NOT_LABELS = "the mask holds values that are not non-negative integers"


def read_volume(path: str):
    """A volume file as a SimpleITK image. NIfTI voxels are read by nibabel, geometry by
    ITK: ITK's NIfTI reader silently zero-fills a truncated .nii or .nii.gz, nibabel
    raises. Other formats (MetaImage, NRRD) are read by ITK, which raises itself."""
    import SimpleITK as sitk

    if not path.lower().endswith((".nii", ".nii.gz")):
        return sitk.ReadImage(path)
    import nibabel as nib

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    proxy = nib.load(path).dataobj
    slope, inter = proxy.slope, proxy.inter
    data = np.asarray(proxy.get_unscaled())  # raises on a truncated file
    if (slope not in (1, None) and np.isfinite(slope)) or (inter not in (0, None)
                                                           and np.isfinite(inter)):  # fmt: skip
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    data = data.reshape(data.shape[: reader.GetDimension()] if data.ndim > reader.GetDimension()
                        else data.shape)  # fmt: skip
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


def same_grid(image, reference) -> bool:
    """Whether two SimpleITK images share size, spacing, origin and direction."""
    return (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=SPACING_TOL_MM)
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=ORIGIN_TOL_MM)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=DIRECTION_TOL)
    )


def ras_affine(spacing, origin, direction) -> np.ndarray:
    """NIfTI (RAS) affine of an ITK (LPS) 3D geometry."""
    d = np.asarray(direction, float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = d * np.asarray(spacing, float)[None, :]
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def load_channel(path: str, reference=None):
    """A SimpleITK image of a volume file (scalar, 3D: a 2D image becomes one slice),
    resampled onto `reference`'s grid (linear) when given and different. Returns (image,
    resampled?)."""
    import SimpleITK as sitk

    image = read_volume(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{image.GetNumberOfComponentsPerPixel()} components per voxel: "
                         "one scalar image per channel is needed")  # fmt: skip
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if reference is None:
        return image, False
    if same_grid(image, reference):
        image.CopyInformation(reference)
        return image, False
    image = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)  # fmt: skip
    return image, True


def stack_channels(paths: list[str]):
    """The channels of one case on the first one's grid: (reference SimpleITK image, data
    (C, z, y, x), indices of the channels that were resampled). Data keep the channels'
    common dtype, float32 when they differ (a resampled channel is float32)."""
    import SimpleITK as sitk

    reference, _ = load_channel(paths[0])
    volumes = [sitk.GetArrayViewFromImage(reference)]
    resampled = []
    for index, path in enumerate(paths[1:], start=1):
        image, was_resampled = load_channel(path, reference)
        if was_resampled:
            resampled.append(index)
        volumes.append(sitk.GetArrayViewFromImage(image))
    dtypes = {v.dtype for v in volumes}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.float32
    return reference, np.stack([np.asarray(v, dtype) for v in volumes]), resampled


def label_dtype(array: np.ndarray) -> np.ndarray:
    """A label map as uint8 (uint16 when a label exceeds 255); raises ValueError if it
    holds anything but non-negative integers."""
    if array.size and (not np.all(np.equal(np.mod(array, 1), 0)) or array.min() < 0):
        raise ValueError(f"{REASON_MASK_NOT_LABELS}: a label map is needed")
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top < 256 else np.uint16)


def _world_to_index(points_xyz: np.ndarray, image) -> np.ndarray:
    """Continuous ITK indices (x, y, z) in `image` of world points (n, 3), LPS mm."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    offset = points_xyz - np.asarray(image.GetOrigin(), float)
    return np.linalg.solve(d, offset.T).T / np.asarray(image.GetSpacing(), float)


def _index_to_world(index_xyz: np.ndarray, image) -> np.ndarray:
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    scaled = index_xyz * np.asarray(image.GetSpacing(), float)
    return scaled @ d.T + np.asarray(image.GetOrigin(), float)


def foreground_outside(mask, reference) -> tuple[int, int]:
    """(foreground voxels of `mask` whose centres fall outside `reference`'s extent,
    foreground voxels in all), both SimpleITK 3D images placed in world space."""
    import SimpleITK as sitk

    foreground = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (x, y, z)
    if not len(foreground):
        return 0, 0
    index = _world_to_index(_index_to_world(foreground.astype(float), mask), reference)
    size = np.asarray(reference.GetSize(), float)
    inside = np.all((index >= -0.5 - INSIDE_TOL_VOXELS)
                    & (index <= size - 0.5 + INSIDE_TOL_VOXELS), axis=1)  # fmt: skip
    return int((~inside).sum()), len(foreground)


def mask_onto(mask, reference) -> tuple[np.ndarray, dict[str, Any]]:
    """A label map (SimpleITK image in world space, any grid) on `reference`'s grid:
    (array (z, y, x) uint8/uint16, notes for the sidecar). The same grid is copied
    exactly; another grid is resampled by nearest neighbour after checking that every
    foreground voxel lies inside the reference image (ValueError with
    `REASON_MASK_OUTSIDE` otherwise). A label that vanishes in the resampling (a structure
    smaller than the reference's voxels) raises ValueError too (`REASON_MASK_LABEL_LOST`):
    a case scored against a reference that lost a structure would be scored wrongly."""
    import SimpleITK as sitk

    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"the mask has {mask.GetNumberOfComponentsPerPixel()} components "
                         "per voxel: a label map is needed")  # fmt: skip
    if mask.GetDimension() == 2:
        mask = sitk.JoinSeries(mask)
    if mask.GetDimension() != 3:
        raise ValueError(f"the mask is a {mask.GetDimension()}D image: a 3D label map is needed")
    source = label_dtype(sitk.GetArrayViewFromImage(mask))
    if same_grid(mask, reference):
        return source, {"mask_resampled": False, "mask_labels": _labels(source)}
    outside, total = foreground_outside(mask, reference)
    if outside:
        raise ValueError(
            f"{REASON_MASK_OUTSIDE}: {outside} of {total} foreground voxels lie outside the "
            "image's extent (a mask of another image, or in other world coordinates)"
        )
    labelled = sitk.GetImageFromArray(source)
    labelled.CopyInformation(mask)
    resampled = sitk.Resample(labelled, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                              0, labelled.GetPixelID())  # fmt: skip
    array = sitk.GetArrayFromImage(resampled)
    lost = sorted(set(_labels(source)) - set(_labels(array)))
    if lost:
        raise ValueError(
            f"{REASON_MASK_LABEL_LOST}: {', '.join(map(str, lost))} (a structure smaller than "
            "the image's voxels vanishes in nearest-neighbour resampling)"
        )
    return array, {"mask_resampled": True, "mask_labels": _labels(array)}


def _labels(array: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(array) if v]


def write_case(
    out_dir: str | os.PathLike,
    series_pid: str,
    data: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None,
    sidecar: dict[str, Any],
    *,
    compression_level: int = 6,
    threads: int = 1,
) -> None:
    """Write a case's image (`data` (C, z, y, x), or (z, y, x) for one channel), its mask
    ((z, y, x) or None: a stale mask is removed) and its sidecar, each atomically, with
    the convert stage's names (`conventions.NIFTI_SUFFIX`, `MASK_SUFFIX`,
    `SIDECAR_SUFFIX`)."""
    from radflow import conventions as C
    from radflow.dicom.nifti import write_nifti
    from radflow.tables import write_bytes_atomic

    out = Path(out_dir)
    mask_path = out / f"{series_pid}{C.MASK_SUFFIX}"
    if mask is not None:
        write_nifti(mask_path, mask, affine, compression_level, threads)
    else:
        mask_path.unlink(missing_ok=True)
    volume = data[0] if data.ndim == 4 and len(data) == 1 else data
    write_nifti(out / f"{series_pid}{C.NIFTI_SUFFIX}", volume, affine, compression_level,
                threads)  # fmt: skip
    write_bytes_atomic(out / f"{series_pid}{C.SIDECAR_SUFFIX}",
                       (json.dumps(sidecar, indent=2) + "\n").encode())  # fmt: skip
