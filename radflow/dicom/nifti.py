"""Read NIfTI images written by `radflow.dicom.convert` back in DICOM display order."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Pixel values and spacing of a converted unit, in the order DICOM stores them.

    Input: a .nii.gz written by `convert_unit` (voxel i = DICOM column, j = row, k = slice).
    Output: (array, spacing_mm). A single-slice image (every 2D unit) gives a float32
    array of shape (rows, columns), with ``array[0, 0]`` the top-left pixel of the DICOM
    image, and spacing (between rows, between columns) in mm. A stack gives
    (slices, rows, columns) and spacing (between slices, between rows, between columns),
    slices in convert's order (ascending along the slice normal). Values are in rescaled
    units (e.g. HU), MONOCHROME1 already inverted. This is the exact inverse of convert's
    layout; it does not reorient other NIfTI files.
    """
    image = nib.load(os.fspath(path))
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D NIfTI image from radflow convert, got {data.ndim}D")
    # pixdim is float32 on disk: round away the float32 noise (0.2 -> 0.20000000298)
    sx, sy, sz = (round(float(z), 6) for z in image.header.get_zooms()[:3])
    if data.shape[2] == 1:
        return np.ascontiguousarray(data[:, :, 0].T), (sy, sx)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (sz, sy, sx)
