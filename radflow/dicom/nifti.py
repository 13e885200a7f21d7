"""Write the NIfTI-1 images of `radflow.dicom.convert` (streamed, parallel gzip) and read
them back in DICOM display order."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from radflow.dicom import radflow_version
from radflow.gzip_parallel import write_gzip

#: Where the voxels start in a single-file NIfTI-1: 348-byte header + 4-byte extension flag.
VOX_OFFSET = 352


def nifti_header_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """The 352 bytes before the voxels of the .nii of `volume` (slices, rows, cols).

    The image is (i = column, j = row, k = slice), data type that of `volume`; qform and
    sform both hold the RAS `affine` (code 1, scanner), units are mm, descrip is
    "radflow <version>", intent_name/aux_file/db_name are empty, scl_slope 1, scl_inter 0,
    no extensions. Only shape and dtype of `volume` are used (the transpose is a view).
    """
    image = nib.Nifti1Image(np.asarray(volume).transpose(2, 1, 0), affine)
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
    header = nifti_header_bytes(data, affine)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write_gzip(fh, [header, data], level=compression_level, threads=threads)
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            tmp.unlink()
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
