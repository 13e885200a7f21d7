"""A small DICOM corpus in every transfer syntax radflow reads, and dcm2niix comparisons.

`write_series` writes a short axial CT series (planted PHI from `dicom_factory`) whose
stored values span the whole range of BitsStored/PixelRepresentation (both extremes are
present), encoded in a chosen transfer syntax with pydicom's encoders (RLE, deflate,
JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg) or imagecodecs (libjpeg-turbo:
JPEG baseline, extended 12-bit, lossless process 14 with predictor 6 and SV1), dev-only encoders.

`reference_nifti` runs dcm2niix on the files. The PyPI dcm2niix cannot read deflated
files or 12-bit JPEG extended; for those `decompressed_copy` writes the same dataset
uncompressed (inflated, or decoded by libjpeg-turbo: a decoder independent of radflow's
libjpeg) and dcm2niix converts that, as dcm2niix's own error message advises.

`compare_with_reference` is the acceptance check: same voxel grid after reorientation to
the closest canonical (RAS) frame, spacing within 1e-3 mm, world coordinates of the
corner voxel centres within 0.01 mm, identical values after rescale (MONOCHROME1: radflow
inverts, dcm2niix does not, so radflow == lo + hi - dcm2niix).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_factory import _base, new_uid

#: dcm2niix (PyPI build) cannot read these; it is run on a decompressed copy instead.
DCM2NIIX_CANNOT_READ = frozenset({DeflatedExplicitVRLittleEndian, JPEGExtended12Bit})
LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000})
PRIVATE_SYNTAX = UID("1.3.46.670589.33.1.4.1")  # a vendor's private compressed syntax
VIDEO_SYNTAX = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264 High Profile


def stored_pattern(rows: int, cols: int, k: int, n: int, bits: int, signed: bool) -> np.ndarray:
    """Stored values of slice k of n: a smooth ramp over the whole representable range
    (rows, columns and slices all change it) with the two extremes in the top-left corner
    and a mid-value block bottom-right that marks the orientation."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    r, c = np.mgrid[0:rows, 0:cols]
    t = (5 * r + 2 * c + 3 * k) / (5 * (rows - 1) + 2 * (cols - 1) + 3 * max(n - 1, 1))
    values = np.round(lo + t * (hi - lo)).astype(np.int64)
    values[0, 0], values[0, 1] = hi, lo
    values[-3:, -2:] = (lo + hi) // 2
    return values


def _array(values: np.ndarray, bits_allocated: int, signed: bool) -> np.ndarray:
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16,
             (16, True): np.int16}[(bits_allocated, signed)]  # fmt: skip
    return values.astype(dtype)


def _encapsulate_jpeg(ds: pydicom.Dataset, values: np.ndarray, syntax: UID) -> None:
    import imagecodecs

    bits = int(ds.BitsStored)
    unsigned = values.view(np.uint16) if values.dtype == np.int16 else values
    if syntax in (JPEGLosslessSV1, JPEGLossless):  # SV1: predictor 1; else one of 2..7
        predictor = 1 if syntax == JPEGLosslessSV1 else 6
        stream = imagecodecs.jpeg8_encode(unsigned, lossless=True, predictor=predictor,
                                          bitspersample=bits)  # fmt: skip
    else:
        stream = imagecodecs.jpeg8_encode(unsigned, level=85, bitspersample=bits)
        ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def encode(ds: pydicom.Dataset, values: np.ndarray, syntax: UID) -> None:
    """Put `values` (rows, cols; dtype of BitsAllocated/PixelRepresentation) into `ds`
    encoded in `syntax`."""
    native = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
    if syntax in native:
        ds.PixelData = values.tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == ExplicitVRBigEndian:
        ds.PixelData = values.astype(values.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        _encapsulate_jpeg(ds, values, syntax)
    elif syntax in (PRIVATE_SYNTAX, VIDEO_SYNTAX):
        ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(60)])  # not decodable
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        options = {
            RLELossless: {"encoding_plugin": "pydicom"},
            JPEGLSLossless: {"encoding_plugin": "pyjpegls"},
            JPEGLSNearLossless: {"encoding_plugin": "pyjpegls", "jls_error": 3},
            JPEG2000Lossless: {"encoding_plugin": "pylibjpeg"},
            JPEG2000: {"encoding_plugin": "pylibjpeg", "j2k_cr": [8]},
        }[syntax]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = values.tobytes()
        ds.compress(syntax, values, **options)


def write_series(
    folder: str | Path,
    *,
    syntax: UID,
    bits_stored: int,
    signed: bool,
    patient_id: str,
    accession: str,
    n_slices: int = 3,
    rows: int = 32,
    cols: int = 36,
    photometric: str = "MONOCHROME2",
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
) -> tuple[list[Path], list[np.ndarray]]:
    """Write an axial CT series in `syntax`; return its files (slice order) and the stored
    values of each slice (32 x 36: OpenJPEG's default 6 resolutions need >= 32 pixels a
    side). BitsAllocated is 8 when bits_stored <= 8, else 16. Slice k has
    RescaleSlope slopes[k] and RescaleIntercept intercepts[k] (default 1 and 0)."""
    folder = Path(folder)
    bits_allocated = 8 if bits_stored <= 8 else 16
    study_uid, series_uid, frame_uid = new_uid(), new_uid(), new_uid()
    paths, stored = [], []
    for k in range(n_slices):
        ds = _base("1.2.840.10008.5.1.4.1.1.2", "CT", patient_id=patient_id, accession=accession,
                   study_uid=study_uid, series_uid=series_uid)  # fmt: skip
        values = stored_pattern(rows, cols, k, n_slices, bits_stored, signed)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.ImagePositionPatient = ["-20.5", "31.25", f"{-12.0 + 2.0 * k:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.7", "0.9"]
        ds.SliceThickness = "2"
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        ds.RescaleSlope = f"{(slopes or [1] * n_slices)[k]:g}"
        ds.RescaleIntercept = f"{(intercepts or [0] * n_slices)[k]:g}"
        ds.RescaleType = "US"
        array = _array(values, bits_allocated, signed)
        encode(ds, array, syntax)
        path = folder / f"slice{k:02d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        # pydicom cannot tell how a private syntax encodes the dataset: say it
        encoding = {"implicit_vr": False, "little_endian": True} if syntax.is_private else {}
        pydicom.dcmwrite(path, ds, enforce_file_format=True, **encoding)
        paths.append(path)
        stored.append(values)
    return paths, stored


def write_colour(path: str | Path, photometric: str, *, patient_id: str, accession: str) -> Path:
    """A 16x12 8-bit colour secondary capture: RGB or PALETTE COLOR uncompressed, or
    YBR_FULL_422 as JPEG baseline (how colour JPEGs are usually stored)."""
    ds = _base("1.2.840.10008.5.1.4.1.1.7", "OT", patient_id=patient_id, accession=accession,
               study_uid=new_uid(), series_uid=new_uid())  # fmt: skip
    rows, cols = 16, 12
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    r, c = np.mgrid[0:rows, 0:cols]
    rgb = np.stack([r * 15, c * 20, (r + c) * 9], axis=-1).astype(np.uint8)
    if photometric == "PALETTE COLOR":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        lut = np.arange(256, dtype=np.uint16).tobytes()
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut)
        ds.PixelData = rgb[..., 0].tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        if photometric == "RGB":
            ds.PixelData = rgb.tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            import imagecodecs

            ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(rgb, level=90)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def decompressed_copy(src: Path, dst: Path) -> Path:
    """`src` rewritten as explicit VR little endian, for dcm2niix. Deflated files are
    inflated; JPEG is decoded by imagecodecs (libjpeg-turbo), not by radflow's decoder."""
    ds = pydicom.dcmread(src)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        import imagecodecs

        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frames = list(generate_frames(ds.PixelData, number_of_frames=n_frames))
        decoded = np.stack([imagecodecs.jpeg8_decode(f) for f in frames])
        dtype = np.uint8 if int(ds.BitsAllocated) == 8 else np.uint16
        ds.PixelData = decoded.astype(dtype).tobytes()
        ds["PixelData"].VR = "OW" if dtype == np.uint16 else "OB"
        if "LossyImageCompression" not in ds:
            ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(dst, ds, enforce_file_format=True)
    return dst


def dcm2niix_binary() -> str | None:
    candidate = Path(sys.executable).parent / "dcm2niix"
    return str(candidate) if candidate.exists() else shutil.which("dcm2niix")


def reference_nifti(
    files: Sequence[Path], work: Path, *, decompress: bool = True, always_decompress: bool = False
) -> list[nib.Nifti1Image]:
    """dcm2niix's NIfTI images of `files` (copied alone into a folder); none if it refused.
    With `decompress`, files in a syntax dcm2niix cannot read are decompressed first
    (`decompressed_copy`); with `always_decompress`, every JPEG file is."""
    binary = dcm2niix_binary()
    if binary is None:
        import pytest

        pytest.skip("dcm2niix binary not installed (pip install dcm2niix)")
    src, out = work / "in", work / "out"
    src.mkdir(parents=True)
    out.mkdir(parents=True)
    for n, path in enumerate(files):
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        syntax = header.file_meta.get("TransferSyntaxUID")
        if always_decompress or (decompress and syntax in DCM2NIIX_CANNOT_READ):
            decompressed_copy(Path(path), src / f"{n:04d}.dcm")
        else:
            shutil.copy(path, src / f"{n:04d}.dcm")
    subprocess.run([binary, "-z", "y", "-f", "%s_%e", "-o", str(out), str(src)],
                   check=False, capture_output=True)  # fmt: skip
    return [nib.load(p) for p in sorted(out.glob("*.nii.gz"))]


def _corners(shape: Sequence[int]) -> np.ndarray:
    return np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                     for k in (0, shape[2] - 1)], float).T  # fmt: skip


def compare_with_reference(
    ours: nib.Nifti1Image,
    ref: nib.Nifti1Image,
    *,
    monochrome1_range: tuple[float, float] | None = None,
    check_origin: bool = True,
) -> np.ndarray:
    """Assert radflow's image matches dcm2niix's geometry (see the module docstring);
    return the absolute value differences per voxel (all 0 when identical). `check_origin=False` compares
    axis directions only (dcm2niix writes no orientation without ImageOrientationPatient)."""
    ours_c, ref_c = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    ref_data = np.squeeze(ref_c.get_fdata(), axis=tuple(range(3, ref_c.ndim)))
    assert ours_c.shape[:3] == ref_data.shape[:3], (ours_c.shape, ref_c.shape)
    np.testing.assert_allclose(ours_c.header.get_zooms()[:3], ref_c.header.get_zooms()[:3],
                               atol=1e-3)  # fmt: skip
    if check_origin:
        corners = _corners(ours_c.shape)
        np.testing.assert_allclose(ours_c.affine @ corners, ref_c.affine @ corners, atol=0.01)
    else:
        np.testing.assert_array_equal(np.sign(np.round(ours_c.affine[:3, :3], 6)),
                                      np.sign(np.round(ref_c.affine[:3, :3], 6)))  # fmt: skip
    expected = ref_data
    if monochrome1_range is not None:
        expected = monochrome1_range[0] + monochrome1_range[1] - ref_data
    ours_data = ours_c.get_fdata()
    return np.abs(ours_data - expected)
