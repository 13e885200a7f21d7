"""Streamed conversion: write_nifti against the in-memory nibabel writer convert used
before, slice-by-slice decoding (direct reads of uncompressed data, int16 -> int32
widening), and how a shard uses cores."""

from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radflow.dicom import radflow_version
from radflow.dicom.convert import plan_workers
from radflow.dicom.nifti import nifti_header_bytes, write_nifti, write_nifti_stream
from radflow.dicom.reader import ConversionError, build_volume, load_slices, slice_pixels

AFFINE = np.array([[-0.6, 0.1, 0, 12.5], [0, -0.8, 0.2, -3], [0, 0, 2.5, 40], [0, 0, 0, 1]])


def reference_nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """The uncompressed file as convert wrote it before streaming (whole image in nibabel)."""
    image = nib.Nifti1Image(volume.transpose(2, 1, 0), affine)
    image.header.set_data_dtype(volume.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = f"radflow {radflow_version()}".encode()
    for field in ("intent_name", "aux_file", "db_name"):
        image.header[field] = b""
    image.header.set_slope_inter(1.0, 0.0)
    return image.to_bytes()


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
@pytest.mark.parametrize("shape", [(1, 5, 7), (6, 12, 10)])
def test_write_nifti_equals_nibabel_file(tmp_path, dtype, shape):
    rng = np.random.default_rng(3)
    volume = (rng.normal(0, 500, shape)).astype(dtype)
    path = write_nifti(tmp_path / "x.nii.gz", volume, AFFINE, 6, threads=2)
    raw = gzip.decompress(path.read_bytes())
    assert raw == reference_nifti_bytes(volume, AFFINE)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert header["descrip"].item() == f"radflow {radflow_version()}".encode()
    assert header["intent_name"].item() == header["aux_file"].item() == b""
    assert header["db_name"].item() == b""
    assert (float(header["scl_slope"]), float(header["scl_inter"])) == (1.0, 0.0)
    assert header.get_data_offset() == 352
    image = nib.load(path)
    assert image.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume.transpose(2, 1, 0))
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)


def test_write_nifti_takes_views_and_is_thread_independent(tmp_path):
    base = (np.arange(300 * 256 * 9) % 1013).astype(np.int16).reshape(300, 256, 9)
    view = base.transpose(2, 1, 0)  # not C-contiguous; 1.4 MB: two gzip chunks
    one = write_nifti(tmp_path / "a.nii.gz", view, AFFINE, threads=1).read_bytes()
    three = write_nifti(tmp_path / "b.nii.gz", view, AFFINE, threads=3).read_bytes()
    assert one == three
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "a.nii.gz").dataobj), view.transpose(2, 1, 0)
    )


def test_write_nifti_is_atomic(tmp_path):
    volume = np.ones((2, 3, 4), np.int16)
    path = write_nifti(tmp_path / "x.nii.gz", volume, AFFINE)
    inode = os.stat(path).st_ino
    write_nifti(path, volume, AFFINE)  # identical: the file is left as it was
    assert os.stat(path).st_ino == inode
    before = path.read_bytes()
    with pytest.raises(ValueError, match="level must be 0-9"):
        write_nifti(path, volume * 2, AFFINE, compression_level=11)
    assert path.read_bytes() == before  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left
    write_nifti(path, volume * 2, AFFINE)
    assert np.asanyarray(nib.load(path).dataobj).max() == 2


def _slice(pixels, bits_stored=16, slope=1.0, intercept=0.0, photometric="MONOCHROME2"):
    """An in-memory single-frame dataset holding `pixels` uncompressed."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored = pixels.dtype.itemsize * 8, bits_stored
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def test_build_volume_decodes_slice_by_slice_and_widens_once():
    """int16 while the values fit; a later slice beyond int16 widens the volume to int32
    keeping the slices before, as the whole-volume conversion did."""
    slices = [_slice(np.full((3, 4), v, np.int16), intercept=1024) for v in (-1000, 2000, 32000)]
    volume, notes = build_volume(slices)
    assert volume.dtype == np.int32
    np.testing.assert_array_equal(volume[:, 0, 0], [24, 3024, 33024])
    volume, _ = build_volume(slices[:2])
    assert volume.dtype == np.int16
    assert notes["rescale_applied"] is True


def test_build_volume_monochrome1_and_float():
    pixels = np.array([[0, 1, 2, 4095]] * 3, np.uint16)
    inverted, notes = build_volume([_slice(pixels, 12, 2.0, -100.0, "MONOCHROME1")])
    np.testing.assert_array_equal(inverted[0], (-100 + 8090) - (2 * pixels.astype(int) - 100))
    assert inverted.dtype == np.int16 and notes["inverted_monochrome1"] is True
    floats, _ = build_volume([_slice(pixels, 12, 0.5, -1024.5)])
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(floats[0], pixels * 0.5 - 1024.5)


@pytest.mark.parametrize(
    "units, threads, expected",
    [(1, 4, (1, 4)), (10, 4, (4, 1)), (2, 5, (2, 2)), (3, 1, (1, 1)), (0, 3, (1, 3))],
)
def test_plan_workers(units, threads, expected):
    processes, per_unit = plan_workers(units, threads)
    assert (processes, per_unit) == expected
    assert processes * per_unit <= threads


@pytest.mark.parametrize(
    "syntax, bits, signed",
    [
        (ExplicitVRLittleEndian, 16, True),
        (ExplicitVRLittleEndian, 16, False),
        (ImplicitVRLittleEndian, 8, False),
        (ExplicitVRBigEndian, 16, True),
        (ExplicitVRLittleEndian, 32, True),
    ],
)
def test_slice_pixels_equals_pydicom(tmp_path, syntax, bits, signed):
    """Uncompressed pixel data decode to pydicom's values and type (byte order aside)."""
    rng = np.random.default_rng(bits)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    info = np.iinfo(dtype)
    # 190 x 180 x 16 bits is beyond load_slices' deferral size: read when decoded
    pixels = rng.integers(max(info.min, -3000), min(info.max, 3000), (190, 180), dtype=dtype)
    if syntax == ExplicitVRBigEndian:
        pixels = pixels.astype(dtype.newbyteorder(">"))
    ds = _slice(pixels.astype(dtype), bits_stored=bits)
    ds.PixelData = pixels.tobytes() + (b"\0" if pixels.nbytes % 2 else b"")
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    path = tmp_path / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = load_slices([str(tmp_path / "slice.dcm")])[0]
    decoded = slice_pixels(header)
    reference = pydicom.dcmread(path).pixel_array
    assert decoded.dtype.newbyteorder("=") == reference.dtype.newbyteorder("=")
    np.testing.assert_array_equal(decoded, reference)
    np.testing.assert_array_equal(decoded, pixels)
    path.write_bytes(path.read_bytes()[:-6])  # truncated: pydicom's own complaint
    with pytest.raises(ConversionError, match="could not be decoded"):
        slice_pixels(load_slices([str(tmp_path / "slice.dcm")])[0])


@pytest.mark.parametrize("signed", [True, False])
def test_slice_pixels_ignores_bits_above_bits_stored(tmp_path, signed):
    """12 bits stored in 16: the high bits may hold anything (old overlays) and a signed
    value's sign bit is bit 11, as pydicom's decoder reads it."""
    stored = np.array([[(-5) & 0x0FFF, 0xF000 | 7], [0x0800, 0x07FF]], dtype=np.uint16)
    stored = np.tile(stored, (100, 100))  # beyond the deferral size: read at its offset
    ds = _slice(stored.astype(np.int16 if signed else np.uint16), bits_stored=12)
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    decoded = slice_pixels(load_slices([str(tmp_path / "slice.dcm")])[0])
    expected = [[-5, 7], [-2048, 2047]] if signed else [[4091, 7], [2048, 2047]]
    np.testing.assert_array_equal(decoded[:2, :2], expected)
    np.testing.assert_array_equal(decoded, pydicom.dcmread(tmp_path / "slice.dcm").pixel_array)


def test_write_nifti_stream_is_independent_of_chunking_and_threads(tmp_path):
    """The dcm2niix route streams dcm2niix's voxels in 4 MiB reads: the file must not depend
    on how the bytes are cut, nor on the thread count, and equal write_nifti's file for the
    same header and voxels."""
    volume = (np.arange(7 * 300 * 256) % 2011 - 900).astype(np.int16).reshape(7, 300, 256)
    header = nifti_header_bytes(volume, AFFINE)
    whole = write_nifti(tmp_path / "whole.nii.gz", volume, AFFINE, 6, threads=1).read_bytes()
    raw = volume.tobytes()
    cuts = [0, 1, 4097, 333_333, len(raw) // 2, len(raw) - 3, len(raw)]
    pieces = [raw[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    for threads in (1, 2):
        path = write_nifti_stream(tmp_path / f"s{threads}.nii.gz", header, pieces, 6, threads)
        assert path.read_bytes() == whole
    memory = write_nifti_stream(tmp_path / "m.nii.gz", header, [memoryview(raw), volume[:0]], 6)
    assert memory.read_bytes() == whole
    assert gzip.decompress(whole) == header + raw
