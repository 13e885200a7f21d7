"""Transfer syntaxes: a generated corpus in every syntax radflow decodes, and the files
pydicom ships, converted by radflow and by dcm2niix and compared voxel by voxel; colour
images and unsupported syntaxes refused with a reason; raw datasets without file meta
read."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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

from radflow import conventions as C
from radflow.dicom import syntax as S
from radflow.dicom.convert import build_volume, convert_shard, convert_unit, stored_range
from radflow.dicom.index import REASON_NOT_DICOM, read_file_record

from dicom_factory import assert_phi_free, write_volume
from dicom_syntaxes import (
    LOSSY,
    PRIVATE_SYNTAX,
    VIDEO_SYNTAX,
    compare_with_reference,
    reference_nifti,
    write_colour,
    write_series,
)

IDS = dict(patient_id="ZQXSYN1", accession="ZQXSYNACC1")

# id: (syntax, bits stored, signed, extra write_series arguments)
CORPUS = {
    "implicit_le-u12": (ImplicitVRLittleEndian, 12, False, {}),
    "implicit_le-s16": (ImplicitVRLittleEndian, 16, True, {}),
    "explicit_le-u8": (ExplicitVRLittleEndian, 8, False, {}),
    "explicit_le-s8": (ExplicitVRLittleEndian, 8, True, {}),
    "explicit_le-u16": (ExplicitVRLittleEndian, 16, False, {}),
    "explicit_be-u8": (ExplicitVRBigEndian, 8, False, {}),
    "explicit_be-s12": (ExplicitVRBigEndian, 12, True, {}),
    "explicit_be-u16": (ExplicitVRBigEndian, 16, False, {}),
    "deflated-u8": (DeflatedExplicitVRLittleEndian, 8, False, {}),
    "deflated-s16": (DeflatedExplicitVRLittleEndian, 16, True, {}),
    "rle-u8": (RLELossless, 8, False, {}),
    "rle-u12": (RLELossless, 12, False, {}),
    "rle-s16": (RLELossless, 16, True, {}),
    "jpeg_baseline-u8": (JPEGBaseline8Bit, 8, False, {}),
    "jpeg_extended-u12": (JPEGExtended12Bit, 12, False, {}),
    "jpeg_lossless_sv1-u8": (JPEGLosslessSV1, 8, False, {}),
    "jpeg_lossless_sv1-u12": (JPEGLosslessSV1, 12, False, {}),
    "jpeg_lossless_sv1-u16": (JPEGLosslessSV1, 16, False, {}),
    "jpeg_lossless_sv1-s16": (JPEGLosslessSV1, 16, True, {}),
    "jpeg_lossless_p14-u12": (JPEGLossless, 12, False, {}),
    "jpeg_lossless_p14-s16": (JPEGLossless, 16, True, {}),
    "jpegls_lossless-u8": (JPEGLSLossless, 8, False, {}),
    "jpegls_lossless-u12": (JPEGLSLossless, 12, False, {}),
    "jpegls_lossless-s16": (JPEGLSLossless, 16, True, {}),
    "jpegls_near_lossless-u8": (JPEGLSNearLossless, 8, False, {}),
    "jpegls_near_lossless-u12": (JPEGLSNearLossless, 12, False, {}),
    "j2k_lossless-u8": (JPEG2000Lossless, 8, False, {}),
    "j2k_lossless-u12": (JPEG2000Lossless, 12, False, {}),
    "j2k_lossless-s16": (JPEG2000Lossless, 16, True, {}),
    "j2k_lossy-u12": (JPEG2000, 12, False, {}),
    "j2k_lossy-s16": (JPEG2000, 16, True, {}),
    # per-slice rescale that varies (float result) and MONOCHROME1, in compressed syntaxes
    "jpegls_lossless-s16-rescale_varies": (JPEGLSLossless, 16, True, {
        "slopes": [1, 2, 0.5], "intercepts": [-1024, 10, 3.5]}),
    "rle-u12-rescale_varies": (RLELossless, 12, False, {
        "slopes": [1, 1, 1], "intercepts": [-1024, -1000, 0]}),
    "j2k_lossless-u12-monochrome1": (JPEG2000Lossless, 12, False, {
        "photometric": "MONOCHROME1"}),
    "jpeg_lossless_sv1-s16-monochrome1": (JPEGLosslessSV1, 16, True, {
        "photometric": "MONOCHROME1", "slopes": [2, 2, 2], "intercepts": [-5, -5, -5]}),
}  # fmt: skip


#: Largest difference from dcm2niix (grey levels). Lossy JPEG: the decoders' inverse DCTs
#: round differently: radflow's libjpeg differs from dcm2niix's own 8-bit decoder and from
#: libjpeg-turbo (12-bit reference) by at most 1 in a few % of voxels; every other syntax,
#: lossy JPEG-LS and JPEG 2000 included, gives identical values.
TOLERANCE = {JPEGBaseline8Bit: 1.0, JPEGExtended12Bit: 1.0}


#: Cases dcm2niix (v1.0.20260724) decodes wrongly, compared with dcm2niix on a copy that
#: libjpeg-turbo decompressed instead: lossless JPEG with predictor 6 at 16-bit precision
#: comes out wrong in ~75-100% of voxels (12- and 15-bit are right), while libjpeg-turbo
#: and radflow's libjpeg both return the written values.
DCM2NIIX_WRONG = {"jpeg_lossless_p14-s16"}


def _convert(files: list[Path], root: Path, out: Path, modality: str = "CT") -> dict:
    rels = [p.relative_to(root).as_posix() for p in files]
    return convert_unit("ser-x", modality, rels, root, out)


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_matches_dcm2niix(case, tmp_path):
    """radflow and dcm2niix agree on grid, spacing, world coordinates and every value; the
    lossless syntaxes also give back exactly the stored values times slope plus intercept."""
    syntax, bits, signed, extra = CORPUS[case]
    root = tmp_path / "dicom"
    files, stored = write_series(root / "ZqxSeries", syntax=syntax, bits_stored=bits,
                                 signed=signed, **IDS, **extra)  # fmt: skip
    for path in files:  # the index accepts every file of the corpus
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
        assert read_file_record(str(root), path.relative_to(root).as_posix(), "PatientID",
                                "AccessionNumber").reason == ""  # fmt: skip
    row = _convert(files, root, tmp_path / "out")
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    ours = nib.load(tmp_path / "out" / f"ser-x{C.NIFTI_SUFFIX}")
    slopes = extra.get("slopes", [1, 1, 1])
    intercepts = extra.get("intercepts", [0, 0, 0])
    monochrome1 = extra.get("photometric") == "MONOCHROME1"
    lo, hi = stored_range(bits, signed)
    ends = [v for s, b in zip(slopes, intercepts, strict=True) for v in (s * lo + b, s * hi + b)]
    value_range = (min(ends), max(ends))

    expected = np.stack([v * s + b for v, s, b in zip(stored, slopes, intercepts, strict=True)])
    if monochrome1:
        expected = value_range[0] + value_range[1] - expected
    data = ours.get_fdata().transpose(2, 1, 0)  # (slice, row, column)
    if syntax in LOSSY:  # near the original on average; the exact check is dcm2niix's below
        assert np.abs(data - expected).mean() <= 0.02 * (value_range[1] - value_range[0])
    else:
        np.testing.assert_array_equal(data, expected)

    refs = reference_nifti(files, tmp_path / "dcm2niix", always_decompress=case in DCM2NIIX_WRONG)
    assert len(refs) == 1
    ref = refs[0]
    if bits == 8 and signed:
        # dcm2niix reads 8-bit data as unsigned whatever PixelRepresentation says; radflow
        # follows PixelRepresentation (the values it returns are the written ones, above)
        raw = ref.get_fdata()
        ref = nib.Nifti1Image(np.where(raw >= 128, raw - 256, raw), ref.affine)
    difference = compare_with_reference(
        ours, ref, monochrome1_range=value_range if monochrome1 else None
    )
    assert difference.max() <= TOLERANCE.get(syntax, 0.0)
    assert (difference > 0).mean() <= 0.1  # measured: 3.4 % (8-bit), 7.9 % (12-bit)


def test_decoder_is_pinned():
    """Lossy JPEG decoders disagree by a few grey levels, so radflow names its decoder."""
    assert S._plugin_for(JPEGBaseline8Bit) == S._plugin_for(JPEG2000) == "pylibjpeg"
    assert S._plugin_for(ExplicitVRLittleEndian) == ""


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL_422", "PALETTE COLOR"])
def test_colour_images_refused_with_reason(photometric, tmp_path):
    root = tmp_path / "dicom"
    path = write_colour(root / "Zqxcolour.dcm", photometric, **IDS)
    assert read_file_record(str(root), path.name, "PatientID", "AccessionNumber").reason == ""
    row = _convert([path], root, tmp_path / "out", modality="OT")
    assert row[C.STATUS] == C.STATUS_FAILED
    assert row[C.REASON] == (
        f"colour image (PhotometricInterpretation {photometric}) in a grayscale study"
    )


@pytest.mark.parametrize(
    ("syntax", "reason"),
    [
        (PRIVATE_SYNTAX, f"unsupported transfer syntax: private transfer syntax {PRIVATE_SYNTAX}"),
        (VIDEO_SYNTAX, "unsupported transfer syntax: MPEG-4 AVC/H.264 High Profile / Level 4.1 "
                       "(video)"),
    ],
    ids=["private", "video"],
)  # fmt: skip
def test_unsupported_syntax_refused_by_index_and_convert(syntax, reason, tmp_path):
    """The index quarantines the file, and a shard that lists it anyway fails only that
    unit, with the same reason; the other unit of the shard converts."""
    root = tmp_path / "dicom"
    bad, _ = write_series(root / "Zqxbad", syntax=syntax, bits_stored=12, signed=False, **IDS,
                          n_slices=2)  # fmt: skip
    good, _ = write_series(root / "Zqxgood", syntax=RLELossless, bits_stored=12, signed=False,
                           **IDS, n_slices=2)  # fmt: skip
    rel = bad[0].relative_to(root).as_posix()
    assert read_file_record(str(root), rel, "PatientID", "AccessionNumber").reason == reason
    table = pd.DataFrame(
        [(f"ser-{name}", "CT", p.relative_to(root).as_posix())
         for name, paths in (("bad", bad), ("good", good)) for p in paths],
        columns=[C.SERIES_PID, C.MODALITY, C.PATH],
    )  # fmt: skip
    shard = tmp_path / "shard-000.tsv"
    table.to_csv(shard, sep="\t", index=False)
    manifest = convert_shard(shard, root, tmp_path / "out", progress=False).set_index(C.SERIES_PID)
    assert manifest.loc["ser-bad", C.STATUS] == C.STATUS_FAILED
    assert manifest.loc["ser-bad", C.REASON] == reason
    assert manifest.loc["ser-good", C.STATUS] == C.STATUS_OK
    assert_phi_free(tmp_path / "out", [p.relative_to(root).as_posix() for p in bad + good])


def test_corrupt_compressed_stream_refused_with_reason(tmp_path):
    root = tmp_path / "dicom"
    files, _ = write_series(root / "Zqxj2k", syntax=JPEG2000Lossless, bits_stored=12,
                            signed=False, **IDS, n_slices=2)  # fmt: skip
    ds = pydicom.dcmread(files[1])
    from pydicom.encaps import encapsulate, generate_frames

    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream[: len(stream) // 3] + bytes(40)])
    ds.save_as(files[1])
    row = _convert(files, root, tmp_path / "out")
    assert row[C.STATUS] == C.STATUS_FAILED
    assert row[C.REASON].startswith(
        "JPEG 2000 Image Compression (Lossless Only) pixel data could not be decoded ("
    )
    assert "Zqx" not in row[C.REASON] and str(root) not in row[C.REASON]


def test_missing_decoder_names_the_package(monkeypatch):
    class Unavailable:
        is_available = False

    monkeypatch.setattr(S, "get_decoder", lambda uid: Unavailable())
    assert S.syntax_problem(JPEGLSLossless) == (
        "no decoder installed for JPEG-LS Lossless Image Compression: install pylibjpeg and "
        "pylibjpeg-libjpeg (see README, Dependencies)"
    )
    assert "pylibjpeg-openjpeg" in S.syntax_problem(JPEG2000)


# ------------------------------------------------------- files that are not Part 10
@pytest.mark.parametrize(
    ("encoding", "implicit", "little"),
    [("explicit_le", False, True), ("implicit_le", True, True), ("explicit_be", False, False),
     ("meta_no_preamble", False, True)],
)  # fmt: skip
def test_dataset_without_preamble_or_meta_converts(encoding, implicit, little, tmp_path):
    """Raw datasets (no preamble, no file meta; old archives write them) are indexed and
    converted like Part 10 files, matching dcm2niix. dcm2niix reads the little-endian ones
    itself; for the other two (it finds no DICOM there) its reference is the Part 10
    original of the same slices."""
    originals = write_volume(tmp_path / "orig", **IDS, n_slices=3, rows=12, cols=10)
    root = tmp_path / "dicom"
    root.mkdir()
    raw_files = []
    for n, path in enumerate(originals):
        ds = pydicom.dcmread(path)
        raw_path = root / f"Zqxraw{n}"  # no extension, no preamble
        if encoding == "meta_no_preamble":
            raw_path.write_bytes(path.read_bytes()[132:])  # drop preamble and "DICM"
        else:
            raw = Dataset()
            raw.update(ds)
            if not little:
                raw.PixelData = ds.pixel_array.astype(">u2").tobytes()
            pydicom.dcmwrite(raw_path, raw, implicit_vr=implicit, little_endian=little)
        assert raw_path.read_bytes()[128:132] != b"DICM"
        record = read_file_record(str(root), raw_path.name, "PatientID", "AccessionNumber")
        assert record.reason == "" and record.modality == "CT" and record.rows == 12
        raw_files.append(raw_path)
    row = _convert(raw_files, root, tmp_path / "out")
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    ours = nib.load(tmp_path / "out" / f"ser-x{C.NIFTI_SUFFIX}")
    direct = reference_nifti(raw_files, tmp_path / "dcm2niix")
    if little and encoding != "meta_no_preamble":
        assert len(direct) == 1
        ref = direct[0]
    else:
        assert direct == []
        ref = reference_nifti(originals, tmp_path / "dcm2niix_original")[0]
    assert compare_with_reference(ours, ref).max() == 0.0


def test_not_dicom_that_starts_like_a_dataset(tmp_path):
    (tmp_path / "notes").write_bytes(b"\x08\x00\x05\x00 not dicom at all")
    assert read_file_record(str(tmp_path), "notes", "PatientID",
                            "AccessionNumber").reason == REASON_NOT_DICOM  # fmt: skip


# ------------------------------------------------------- the files pydicom ships
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

#: What radflow does with each file pydicom ships: "ok" (converted, compared with
#: dcm2niix), else the index's or the conversion's reason (prefix).
_COLOUR = "colour image (PhotometricInterpretation {}) in a grayscale study"
_NO_GEOMETRY = "missing ImageOrientationPatient or ImagePositionPatient"
EXPECTED = {
    "693_J2KI.dcm": "ok",
    "CT_small.dcm": "ok",
    "ExplVR_BigEnd.dcm": _COLOUR.format("RGB"),
    "ExplVR_BigEndNoMeta.dcm": "non-image object: RTPLAN",
    "ExplVR_LitEndNoMeta.dcm": "non-image object: RTPLAN",
    "GDCMJ2K_TextGBR.dcm": _COLOUR.format("YBR_RCT"),
    "J2K_pixelrep_mismatch.dcm": "ok",
    "JPEG-lossy.dcm": _NO_GEOMETRY,
    "JPEG2000-embedded-sequence-delimiter.dcm": _NO_GEOMETRY,
    "JPEG2000.dcm": _NO_GEOMETRY,
    "JPEGLSNearLossless_08.dcm": "missing SeriesInstanceUID",
    "JPEGLSNearLossless_16.dcm": "missing SeriesInstanceUID",
    "JPGExtended.dcm": _NO_GEOMETRY,
    "MR_small.dcm": "ok",
    "MR_small_RLE.dcm": "ok",
    "MR_small_bigendian.dcm": "ok",
    "MR_small_expb.dcm": "ok",
    "MR_small_implicit.dcm": "ok",
    "MR_small_jp2klossless.dcm": "ok",
    "MR_small_jpeg_ls_lossless.dcm": "ok",
    "MR_small_padded.dcm": "ok",
    "MR_truncated.dcm": "truncated file: pixel data incomplete (8130 of 8192 bytes)",
    "README.txt": REASON_NOT_DICOM,
    "SC_jpeg_no_color_transform.dcm": _COLOUR.format("RGB"),
    "SC_jpeg_no_color_transform_2.dcm": _COLOUR.format("RGB"),
    "SC_rgb_dcmtk_+eb+cr.dcm": _COLOUR.format("RGB"),
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": _COLOUR.format("YBR_FULL"),
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": _COLOUR.format("YBR_FULL"),
    "SC_rgb_dcmtk_+eb+cy+np.dcm": _COLOUR.format("YBR_FULL_422"),
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": _COLOUR.format("YBR_FULL_422"),
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": _COLOUR.format("YBR_FULL"),
    "SC_rgb_gdcm_KY.dcm": _COLOUR.format("RGB"),
    "SC_rgb_jls_lossy_line.dcm": "missing SeriesInstanceUID",
    "SC_rgb_jls_lossy_sample.dcm": "missing SeriesInstanceUID",
    # its encapsulated pixel data is malformed (an item of length 65535 in a 3.5 kB file)
    "SC_rgb_jpeg.dcm": "truncated file: pixel data incomplete (3522 of 65535 bytes)",
    "SC_rgb_jpeg_app14_dcmd.dcm": _COLOUR.format("RGB"),
    "SC_rgb_jpeg_dcmd.dcm": _COLOUR.format("RGB"),
    "SC_rgb_jpeg_dcmtk.dcm": _COLOUR.format("YBR_FULL"),
    "SC_rgb_jpeg_gdcm.dcm": _COLOUR.format("RGB"),
    "SC_rgb_jpeg_lossy_gdcm.dcm": _COLOUR.format("YBR_FULL"),
    "SC_rgb_rle.dcm": _COLOUR.format("RGB"),
    "SC_rgb_rle_16bit.dcm": _COLOUR.format("RGB"),
    "SC_rgb_rle_16bit_2frame.dcm": _COLOUR.format("RGB"),
    "SC_rgb_rle_2frame.dcm": _COLOUR.format("RGB"),
    "SC_rgb_rle_32bit.dcm": _COLOUR.format("RGB"),
    "SC_rgb_rle_32bit_2frame.dcm": _COLOUR.format("RGB"),
    "SC_rgb_small_odd.dcm": _COLOUR.format("RGB"),
    "SC_rgb_small_odd_big_endian.dcm": _COLOUR.format("RGB"),
    "SC_rgb_small_odd_jpeg.dcm": _COLOUR.format("YBR_FULL"),
    "SC_ybr_full_422_uncompressed.dcm": _COLOUR.format("YBR_FULL_422"),
    "UN_sequence.dcm": "truncated file: it ends before the pixel data",
    "badVR.dcm": "non-image object: RTDOSE",
    "crayons.icc": REASON_NOT_DICOM,
    "empty_charset_LEI.dcm": "non-image object: unknown SOP class",
    "examples_jpeg2k.dcm": _COLOUR.format("YBR_RCT"),
    "examples_overlay.dcm": "ok",
    "examples_palette.dcm": _COLOUR.format("PALETTE COLOR"),
    "examples_rgb_color.dcm": _COLOUR.format("RGB"),
    "examples_ybr_color.dcm": _COLOUR.format("YBR_FULL_422"),
    "image_dfl.dcm": _NO_GEOMETRY,
    "liver_1frame.dcm": "non-image object: SEG",
    "liver_expb_1frame.dcm": "non-image object: SEG",
    "meta_missing_tsyntax.dcm": "incomplete image header (no Rows, Columns or BitsAllocated)",
    "nested_priv_SQ.dcm": "incomplete image header (no Rows, Columns or BitsAllocated)",
    # "CT_small without meta", but with a stray leading byte: no parser finds a dataset
    "no_meta.dcm": REASON_NOT_DICOM,
    "no_meta_group_length.dcm": "truncated file: it ends before the pixel data",
    "priv_SQ.dcm": "truncated file: it ends before the pixel data",
    "reportsi.dcm": "non-image object: SR",
    "reportsi_with_empty_number_tags.dcm": "non-image object: SR",
    "rtdose.dcm": "non-image object: RTDOSE",
    "rtdose_1frame.dcm": "non-image object: RTDOSE",
    "rtdose_expb.dcm": "non-image object: RTDOSE",
    "rtdose_expb_1frame.dcm": "non-image object: RTDOSE",
    "rtdose_rle.dcm": "non-image object: RTDOSE",
    "rtdose_rle_1frame.dcm": "non-image object: RTDOSE",
    "rtplan.dcm": "non-image object: RTPLAN",
    "rtplan.dump": REASON_NOT_DICOM,
    "rtplan_truncated.dcm": "non-image object: RTPLAN",
    "rtstruct.dcm": "non-image object: RTSTRUCT",
    "rtstruct.dump": REASON_NOT_DICOM,
    "test-SR.dcm": "non-image object: SR",
    "test1.json": REASON_NOT_DICOM,
    "test_PN.json": REASON_NOT_DICOM,
    "waveform_ecg.dcm": "non-image object: ECG",
    "zipMR.gz": REASON_NOT_DICOM,
}

#: Grayscale files radflow refuses for their header (geometry, identifiers) whose pixels
#: it still decodes: the decoded, rescaled values are compared with dcm2niix's.
#: Largest difference from dcm2niix per file: JPGExtended.dcm is 12-bit lossy JPEG, which
#: dcm2niix cannot read; its reference is decoded by libjpeg-turbo (see TOLERANCE).
DECODE_ONLY = {
    "JPEG2000.dcm": 0, "JPGExtended.dcm": 1, "image_dfl.dcm": 0,
    "JPEGLSNearLossless_08.dcm": 0, "JPEGLSNearLossless_16.dcm": 0,
}  # fmt: skip
#: Files neither radflow nor dcm2niix decodes (radflow's reason, dcm2niix's error):
#: JPEG-lossy.dcm is 12-bit JPEG extended with a scan header libjpeg rejects as
#: non-conforming (libjpeg-turbo, e.g. in imagecodecs, is lenient and decodes it);
#: JPEG2000-embedded-sequence-delimiter.dcm has a fragment neither OpenJPEG accepts.
UNDECODABLE = {
    "JPEG-lossy.dcm": "JPEG Extended (Process 2 and 4) pixel data could not be decoded",
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000 Image Compression pixel data "
    "could not be decoded",
}


def _shipped_files() -> list[str]:
    return sorted(p.name for p in TEST_FILES.iterdir() if p.is_file())


def test_every_shipped_file_has_an_expectation():
    """A pydicom release that ships new files makes this fail until they are classified."""
    assert set(_shipped_files()) == set(EXPECTED)


def _dcm2niix_image(name: str, work: Path) -> nib.Nifti1Image:
    refs = reference_nifti([TEST_FILES / name], work)
    # dcm2niix writes an overlay plane as a second image (suffix _ROI1), the image first
    refs = [r for r in refs if not r.get_filename().endswith("_ROI1.nii.gz")]
    assert len(refs) == 1
    return refs[0]


def _as_stored(ref: nib.Nifti1Image, rows: int, cols: int) -> list[np.ndarray]:
    """dcm2niix's 2D image in the 4 row/column flips of (rows, cols) layout: without
    ImageOrientationPatient it flips rows; the decoder check finds the layout itself."""
    image = np.squeeze(ref.get_fdata()).T
    assert image.shape == (rows, cols)
    return [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pydicom_file(name, tmp_path):
    """Every file pydicom ships: the index and conversion give the expected outcome; every
    refusal has a reason; a converted file matches dcm2niix (grid, spacing, world
    coordinates, values); a refused grayscale file's decoded values match dcm2niix's."""
    record = read_file_record(str(TEST_FILES), name, "PatientID", "AccessionNumber")
    outcome = record.reason
    row = None
    if not outcome:
        row = convert_unit("ser-x", record.modality, [name], TEST_FILES, tmp_path / "out")
        outcome = row[C.REASON] if row[C.STATUS] == C.STATUS_FAILED else "ok"
    assert outcome.startswith(EXPECTED[name]), outcome
    assert outcome and (outcome == "ok") == (EXPECTED[name] == "ok")

    if outcome == "ok":
        ours = nib.load(tmp_path / "out" / f"ser-x{C.NIFTI_SUFFIX}")
        ref = _dcm2niix_image(name, tmp_path / "dcm2niix")
        difference = compare_with_reference(ours, ref)
        if name == "J2K_pixelrep_mismatch.dcm":
            # PixelRepresentation 1 with an unsigned 13-bit J2K codestream. radflow (pydicom)
            # follows the DICOM header: value - 2^13 above 2^12 - 1 (-2000 HU padding, air
            # near -1000); dcm2niix keeps the codestream's unsigned values.
            ours_values = nib.as_closest_canonical(ours).get_fdata()
            ref_values = np.squeeze(nib.as_closest_canonical(ref).get_fdata())[..., None]
            np.testing.assert_array_equal(
                ours_values, np.where(ref_values >= 4096, ref_values - 8192, ref_values)
            )
            assert difference.max() == 8192
        else:
            assert difference.max() == 0.0
    elif name in DECODE_ONLY:
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(TEST_FILES / name)
        volume, _ = build_volume([ds])
        candidates = _as_stored(_dcm2niix_image(name, tmp_path / "dcm2niix"), *volume.shape[1:])
        difference = min((np.abs(c - volume[0]) for c in candidates), key=np.max)
        assert difference.max() <= DECODE_ONLY[name]
        assert (difference > 0).mean() <= 0.1
    elif name in UNDECODABLE:
        ds = pydicom.dcmread(TEST_FILES / name)
        with pytest.raises(S.DecodeError, match=re.escape(UNDECODABLE[name])):
            S.decode_pixels(ds)
        refs = reference_nifti([TEST_FILES / name], tmp_path / "dcm2niix", decompress=False)
        assert refs == []


def test_dicomdir_tree_is_indexed_as_dicomdir_and_images(tmp_path):
    """pydicom's DICOMDIR test tree: DICOMDIR files (any name) are quarantined as such, the
    images (file names without extension) are read, the pixel-less stubs of TINY_ALPHA are
    quarantined as truncated and the READMEs as not DICOM."""
    import shutil

    root = tmp_path / "dicom"
    shutil.copytree(TEST_FILES / "dicomdirtests", root)
    found: dict[tuple[str, str], int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        reason = read_file_record(str(root), rel, "PatientID", "AccessionNumber").reason
        kind = ("dicomdir" if path.name.startswith("DICOMDIR") else "readme"
                if path.name.startswith("README") else "stub" if rel.startswith("TINY_ALPHA")
                else "image")  # fmt: skip
        found[kind, reason] = found.get((kind, reason), 0) + 1
    assert found == {
        ("dicomdir", "DICOMDIR (directory record, not an image)"): 8,
        ("readme", REASON_NOT_DICOM): 2,
        ("stub", "truncated file: it ends before the pixel data"): 50,
        ("image", ""): 31,
    }
