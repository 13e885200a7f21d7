"""Write the NIfTI-1 images of `radflow.dicom.convert` (streamed, parallel gzip) and read
them back (2D in DICOM display order, 3D in closest-canonical RAS order)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from radflow.dicom import radflow_version
from radflow.gzip_parallel import write_gzip
from radflow.tables import atomic_path

#: Where the voxels start in a single-file NIfTI-1: 348-byte header + 4-byte extension flag.
VOX_OFFSET = 352


def nifti_header_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """The 352 bytes before the voxels of the .nii of `volume` (slices, rows, cols), or
    (channels, slices, rows, cols) for a multi-channel image (channels on the 4th axis).

    The image is (i = column, j = row, k = slice), data type that of `volume`; qform and
    sform both hold the RAS `affine` (code 1, scanner), units are mm, descrip is
    "radflow <version>", intent_name/aux_file/db_name are empty, scl_slope 1, scl_inter 0,
    no extensions. Only shape and dtype of `volume` are used (the transpose is a view).
    """
    image = nib.Nifti1Image(np.asarray(volume).T, affine)
    header = image.header
    header.set_data_dtype(volume.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header["descrip"] = f"radflow {radflow_version()}"[:79].encode()
    header["intent_name"] = b""
    header["aux_file"] = b""
    header["db_name"] = b""
    image.update_header()
    header.set_slope_inter(1.0, 0.0)
    header.set_data_offset(VOX_OFFSET)
    return header.binaryblock + b"\x00" * (VOX_OFFSET - len(header.binaryblock))


def write_nifti(
    path: str | os.PathLike,
    volume: np.ndarray,
    affine: np.ndarray,
    compression_level: int = 6,
    threads: int = 1,
) -> Path:
    """Write `volume` (slices, rows, cols) as gzipped NIfTI-1 to `path`, atomically.

    Layout: voxel (i, j, k) = volume[k, j, i]; the C order of `volume` already is NIfTI's
    x-fastest order, so the header and the array's own memory are streamed into the gzip
    writer without a transposed copy (`volume` is made C-contiguous only if it is not).
    Compression: one gzip member at `compression_level` by `threads` threads, the bytes
    independent of the thread count (`radflow.gzip_parallel`). The file is written to a
    temporary name in the same folder and renamed, so a killed job leaves no partial file;
    an identical existing file is left untouched. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(volume)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return write_nifti_stream(path, nifti_header_bytes(data, affine), [data],
                              compression_level, threads)  # fmt: skip


def write_nifti_stream(
    path: str | os.PathLike,
    header: bytes,
    pieces: Iterable[bytes | memoryview | np.ndarray],
    compression_level: int = 6,
    threads: int = 1,
) -> Path:
    """Gzip `header` and then `pieces` (the voxel bytes, any chunking) into `path`:
    one gzip member whose bytes do not depend on `threads` or the chunking, written to a
    temporary name in the same folder and renamed (an identical file is left untouched)."""
    path = Path(path)
    with atomic_path(path, keep_identical=True) as tmp, open(tmp, "wb") as fh:
        write_gzip(fh, itertools.chain([header], pieces), level=compression_level,
                   threads=threads)  # fmt: skip
    return path


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Pixel values and spacing of a converted 2D or 3D unit.

    A single-slice image (every 2D unit, radflow's layout: voxel i = DICOM column, j =
    row) gives a float32 array (rows, columns) with ``array[0, 0]`` the top-left pixel of
    the DICOM image, and spacing (between rows, between columns) in mm. A 3D image (from
    either route, whatever its storage order) is first reoriented to the closest RAS+
    axes, so every unit of a study is in one orientation, and gives (k, j, i) =
    (inferior->superior, posterior->anterior, left->right) for an axial scan, spacing in
    the same order. Values are in rescaled units (e.g. HU; scl_slope/inter applied). A 4D
    image raises ValueError: stages that need 3D skip it by the manifest's ndim first.
    """
    image = nib.load(os.fspath(path))
    if len(image.shape) > 3 and any(n > 1 for n in image.shape[3:]):
        raise ValueError(f"{image.shape[3]}-volume 4D image: a 3D image is needed")
    if len(image.shape) == 2 or image.shape[2] == 1:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(image.shape[:2])
        # pixdim is float32 on disk: round away the float32 noise (0.2 -> 0.20000000298)
        sx, sy = (round(float(z), 6) for z in image.header.get_zooms()[:2])
        return np.ascontiguousarray(data.T), (sy, sx)
    if len(image.shape) > 3:
        image = image.slicer[..., 0]
    image = nib.as_closest_canonical(image)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    sx, sy, sz = (round(float(z), 6) for z in image.header.get_zooms()[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (sz, sy, sx)


def read_channels(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """A multi-channel image (channels on the 4th NIfTI axis, as the images-table
    conversion writes them): (C, *spatial) float32 and the spatial spacing, each channel
    laid out as `read_image` lays out a single-channel image. A 3D file gives C = 1."""
    image = nib.load(os.fspath(path))
    if len(image.shape) <= 3:
        data, spacing = read_image(path)
        return data[None], spacing
    planar = image.shape[2] == 1
    if not planar:
        image = nib.as_closest_canonical(image)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    zooms = [round(float(z), 6) for z in image.header.get_zooms()[:3]]
    channels = data.reshape(*data.shape[:3], -1)
    if planar:
        out = channels[:, :, 0, :].transpose(2, 1, 0)  # (C, rows, cols)
        return np.ascontiguousarray(out), (zooms[1], zooms[0])
    out = channels.transpose(3, 2, 1, 0)  # (C, k, j, i)
    return np.ascontiguousarray(out), (zooms[2], zooms[1], zooms[0])
