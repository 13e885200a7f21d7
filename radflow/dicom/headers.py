"""Read DICOM headers (never pixel data) into `FileRecord`s: the index's view of each file.

`read_file_record` classifies one file (image, or why not: not DICOM, empty, truncated,
non-image object, colour or syntax problems found later...) and keeps the few header
values the index needs; `scan_files` does it for a whole tree in parallel processes.
Also here: functional-group access for enhanced multi-frame files, and the one set of geometric tolerances
(`SAME_POSITION_MM`, `ORIENTATION_TOLERANCE`) that grouping and conversion share.

Identifier values (patient ids, UIDs, label keys) stay in memory in the records; only
pseudonyms leave the index.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from radflow import conventions as C
from radflow.deid import quiet_pydicom
from radflow.dicom.syntax import syntax_problem, transfer_syntax

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Modalities whose objects carry no image to learn from (reports, annotations,
#: registrations, plans, waveforms, documents, raw data).
NON_IMAGE_MODALITIES = frozenset(
    {
        "SR", "PR", "KO", "DOC", "REG", "FID", "RWV", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD",
        "RTDOSE", "PLAN", "RAW", "AU", "ECG", "HD", "EPS", "RESP", "SMR", "M3D", "OSS",
    }
)  # fmt: skip

#: Reasons used in the quarantine table (the variable parts are counts or DICOM keywords).
REASON_NOT_DICOM = "not a DICOM file"
REASON_EMPTY = "empty file"
REASON_DICOMDIR = "DICOMDIR (directory record, not an image)"
REASON_DUPLICATE = "duplicate instance"
REASON_NO_LABEL = "no label in labels table"
REASON_TRUNCATED_HEADER = "truncated file: it ends before the pixel data"
#: Header elements read by the index (plus the label and patient keys given by the user).
_INDEX_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
    # geometry and unit keys: localizer exclusion and splitting a series into units
    "SeriesNumber",
    "ImageType",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "EchoNumbers",
    "EchoTime",
    "TemporalPositionIdentifier",
    "TriggerTime",
    "AcquisitionNumber",
    "DiffusionBValue",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)

#: Keys that can separate the stacks of one series, in the order they are tried:

#: Philips private Diffusion Direction (2001,1004): "I" marks an isotropic (trace) image.
PHILIPS_DIFFUSION_DIRECTION = 0x20011004

#: Keys on which dcm2niix refuses to stack slices into one image (it writes one file per
#: value: "_e2", "_ph"...), so radflow makes one unit per value: (name used in unit ids,
#: classic keyword, functional group macro, element in it). Everything else that varies
#: within a series (time points, b-values, acquisitions) stays in one unit, a 4D image.
UNIT_KEYS = (
    ("echo", "EchoNumbers", "", ""),
    ("te", "EchoTime", "MREchoSequence", "EffectiveEchoTime"),
    ("part", "", "MRImageFrameTypeSequence", "ComplexImageComponent"),
)  # fmt: skip
#: Slices whose positions along the normal differ by less are "the same" position.
SAME_POSITION_MM = 0.01
#: Direction cosines that differ by more belong to different orientations.
ORIENTATION_TOLERANCE = 1e-3

#: ImageType value 3/4 (or Philips/GE spelled out) -> complex part of the image.
_PARTS = {"M": "M", "MAGNITUDE": "M", "P": "P", "PHASE": "P", "R": "R", "REAL": "R",
          "I": "I", "IMAGINARY": "I"}  # fmt: skip


# ------------------------------------------------------------------- file records
@dataclass(frozen=True, slots=True)
class SliceKey:
    """What the index knows of one slice: a single-frame file, one frame of an enhanced
    multi-frame file, or a legacy multi-frame file as a whole (frame None)."""

    frame: int | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 cosines)
    position: tuple[float, ...] | None  # ImagePositionPatient (LPS mm)
    keys: tuple[tuple[str, str], ...] = ()  # (UNIT_KEYS name, value) present


@dataclass(slots=True)
class FileRecord:
    """What the index keeps of one file. Identifier fields stay in memory only."""

    path: str  # relative to the DICOM root, POSIX separators
    reason: str = ""  # empty for a usable image instance
    sop_uid: str = ""
    series_uid: str = ""
    study_uid: str = ""
    modality: str = ""
    patient: str = ""  # value of the patient key (e.g. PatientID)
    label_value: str = ""  # value of the label key (e.g. AccessionNumber)
    rows: int = 0
    columns: int = 0
    photometric: str = ""
    pixel_spacing: str = ""
    body_part: str = ""
    view_position: str = ""
    manufacturer: str = ""
    image_type: str = ""
    series_number: str = ""
    bits_allocated: int = 0
    trace: bool = False  # a derived isotropic diffusion (trace) image (Philips)
    n_frames: int = 1
    slices: list[SliceKey] = field(default_factory=list)
    #: values of further keywords the index asked for (case key, channel keyword, mask
    #: key), {keyword: text}; identifiers and free text, in memory only
    keys: dict[str, str] = field(default_factory=dict)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _vector(ds: pydicom.Dataset | None, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword) if ds is not None else None
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def frame_groups(ds: pydicom.Dataset, frame: int) -> list[pydicom.Dataset]:
    """The functional group items that apply to `frame` (0-based) of an enhanced
    multi-frame dataset: the shared item first, then the frame's own (whose values win).
    Empty for a legacy multi-frame or single-frame dataset."""
    items = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        items.append(per_frame[frame])
    return items


def group_value(items: Sequence[pydicom.Dataset], macro: str, keyword: str) -> Any:
    """Value of `keyword` inside the functional group `macro`; the last item that has it
    wins (per-frame over shared). None if absent."""
    found = None
    for item in items:
        seq = item.get(macro)
        if seq and keyword in seq[0] and seq[0][keyword].value not in (None, ""):
            found = seq[0][keyword].value
    return found


def _slice_keys(ds: pydicom.Dataset, n_frames: int) -> list[SliceKey]:
    """One SliceKey per frame of an enhanced multi-frame file, else one for the file."""
    if n_frames > 1 and ds.get("PerFrameFunctionalGroupsSequence"):
        out = []
        for frame in range(n_frames):
            items = frame_groups(ds, frame)
            holder = pydicom.Dataset()
            for keyword, macro in (("ImageOrientationPatient", "PlaneOrientationSequence"),
                                   ("ImagePositionPatient", "PlanePositionSequence")):  # fmt: skip
                value = group_value(items, macro, keyword)
                if value is not None:
                    setattr(holder, keyword, value)
            keys = []
            for name, _, macro, keyword in UNIT_KEYS:
                value = group_value(items, macro, keyword) if macro else None
                if name == "part" and value is not None:
                    value = _PARTS.get(str(value).strip().upper(), "")
                if value is not None and str(value).strip():
                    keys.append((name, _key_text(value)))
            out.append(SliceKey(frame, _vector(holder, "ImageOrientationPatient", 6),
                                _vector(holder, "ImagePositionPatient", 3), tuple(keys)))  # fmt: skip
        return out
    keys = [(name, _key_text(_text(ds, keyword))) for name, keyword, _, _ in UNIT_KEYS
            if keyword and _text(ds, keyword)]  # fmt: skip
    image_type = _text(ds, "ImageType").upper().split("\\")
    part = next((_PARTS[v] for v in image_type[2:4] if v in _PARTS), "")
    part = part or next((_PARTS[v] for v in image_type if v in ("PHASE", "REAL", "IMAGINARY")), "")
    if part:
        keys.append(("part", part))
    keys = tuple(keys)
    return [
        SliceKey(None, _vector(ds, "ImageOrientationPatient", 6),
                 _vector(ds, "ImagePositionPatient", 3), keys)
    ]  # fmt: skip


def _key_text(value: Any) -> str:
    """A unit key's value as text: numbers in their shortest form ("12.46", "2")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return f"{number:.6g}" if math.isfinite(number) else str(value).strip()


def format_mm(value: float) -> str:
    """A length in mm as text: 3 decimals ("0.150") unless more are needed ("0.1386")."""
    text = f"{value:.3f}"
    return text if abs(float(text) - value) < 1e-9 else f"{value:.6g}"


def _spacing_text(ds: pydicom.Dataset) -> str:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and not isinstance(value, str) and len(value) == 2:
            try:
                return "\\".join(format_mm(float(v)) for v in value)
            except (TypeError, ValueError):
                continue
    return ""


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    # An unknown (private) class's "name" is the UID itself: never report a UID.
    return "" if not name or name == uid else name


def _is_non_image_class(uid: str) -> bool:
    name = _sop_class_name(uid)
    return bool(name) and "Image" not in name


def _short_error(exc: BaseException, path: str) -> str:
    """Exception type and first line of its message, without the file path, <= 120 chars."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    for text in (path, os.path.dirname(path), os.path.basename(path)):
        if text:
            message = message.replace(text, "<file>")
    message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message[:120]


def _pixel_data_problem(
    fh: Any, ds: pydicom.Dataset, file_size: int, position: int
) -> tuple[bool, str]:
    """(found, problem) for the element at `position`, where stop_before_pixels left off.

    Checks that a Pixel Data element follows and that the file holds all its bytes (a copy
    interrupted mid-file still has a complete header). Deflated files are not checked:
    their file offset does not map onto the dataset.
    """
    ts = transfer_syntax(ds)  # a dataset without file meta: the encoding pydicom found
    if not ts.is_transfer_syntax:  # private syntax: layout unknown, leave it to convert
        return True, ""
    if ts.is_deflated:
        return True, ""
    header = fh.read(12)
    little = ts.is_little_endian
    group = struct.unpack("<H" if little else ">H", header[:2])[0] if len(header) >= 2 else 0
    if group != 0x7FE0:
        return False, ""
    endian = "<" if little else ">"
    if ts.is_implicit_VR:
        header_len, length = 8, struct.unpack(f"{endian}I", header[4:8])[0]
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
        header_len, length = 12, struct.unpack(f"{endian}I", header[8:12])[0]
    else:
        header_len, length = 8, struct.unpack(f"{endian}H", header[6:8])[0]
    if length == 0xFFFFFFFF:  # encapsulated (compressed): fragments are not walked here
        return True, "" if file_size > position + header_len else REASON_TRUNCATED_HEADER
    available = file_size - position - header_len
    if available < length:
        return True, f"truncated file: pixel data incomplete ({available} of {length} bytes)"
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        needed = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * frames
            * int(ds.BitsAllocated) // 8
        )  # fmt: skip
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            needed = needed * 2 // 3  # native 4:2:2 stores two chroma samples per pixel pair
    except (AttributeError, TypeError, ValueError):
        return True, ""
    if not ts.is_compressed and length < needed:
        return True, f"pixel data too short for Rows x Columns ({length} of {needed} bytes)"
    return True, ""


def read_file_record(
    root: str, rel: str, patient_key: str, label_key: str, extra_keys: Sequence[str] = ()
) -> FileRecord:
    """Read one file's header (no pixels) and classify it.

    Inputs: the DICOM root, the file's path relative to it, the keywords of the patient
    and label keys, and further keywords whose values the caller needs (`extra_keys`,
    kept in `FileRecord.keys`). Output: a `FileRecord` whose `reason` is empty for a
    usable image.
    """
    rec = FileRecord(path=rel)
    path = os.path.join(root, rel)
    tags = [*_INDEX_KEYWORDS, PHILIPS_DIFFUSION_DIRECTION, patient_key, label_key, *extra_keys]
    try:
        file_size = os.path.getsize(path)
        if file_size == 0:
            rec.reason = REASON_EMPTY
            return rec
        with quiet_pydicom(), open(path, "rb") as fh:
            ds = _read_header(fh, tags)
            position = fh.tell()
            has_pixels, pixel_problem = _pixel_data_problem(fh, ds, file_size, position)
            meta_class = (
                str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
                if hasattr(ds, "file_meta")
                else ""
            )
            sop_class = str(ds.get("SOPClassUID", "") or meta_class).strip()
            modality = _text(ds, "Modality").upper()
            if DICOMDIR_SOP_CLASS in (sop_class, meta_class):
                rec.reason = REASON_DICOMDIR
                return rec
            if _is_non_image_class(sop_class) or modality in NON_IMAGE_MODALITIES:
                what = modality or _sop_class_name(sop_class) or "unknown SOP class"
                rec.reason = f"non-image object: {what}"
                return rec
            has_geometry = all(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
            if not has_pixels:
                if has_geometry or "Image" in _sop_class_name(sop_class):
                    rec.reason = REASON_TRUNCATED_HEADER
                else:
                    what = modality or _sop_class_name(sop_class) or "unknown SOP class"
                    rec.reason = f"non-image object: {what}"
                return rec
            if not has_geometry:
                rec.reason = "incomplete image header (no Rows, Columns or BitsAllocated)"
                return rec
            syntax = syntax_problem(transfer_syntax(ds))
            if syntax:
                rec.reason = syntax
                return rec
            if pixel_problem:
                rec.reason = pixel_problem
                return rec
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                if not _text(ds, keyword):
                    rec.reason = f"missing {keyword}"
                    return rec
            frames = int(ds.get("NumberOfFrames") or 1)
            if frames > 1 and (modality or "OT") in C.PROJECTION_MODALITIES:
                rec.reason = (
                    f"multi-frame instance ({frames} frames) of a projection modality "
                    "(cine or tomosynthesis) is not supported"
                )
                return rec
            rec.sop_uid = _text(ds, "SOPInstanceUID")
            rec.series_uid = _text(ds, "SeriesInstanceUID")
            rec.study_uid = _text(ds, "StudyInstanceUID")
            rec.modality = modality or "OT"
            rec.patient = _text(ds, patient_key)
            rec.label_value = _text(ds, label_key)
            rec.rows, rec.columns = int(ds.Rows), int(ds.Columns)
            rec.photometric = _text(ds, "PhotometricInterpretation")
            rec.pixel_spacing = _spacing_text(ds)
            rec.body_part = _text(ds, "BodyPartExamined")
            rec.view_position = _text(ds, "ViewPosition")
            rec.manufacturer = _text(ds, "Manufacturer")
            rec.image_type = _text(ds, "ImageType").upper()
            rec.series_number = _text(ds, "SeriesNumber")
            rec.bits_allocated = int(ds.BitsAllocated)
            rec.trace = _is_trace(ds)
            rec.n_frames = frames
            rec.slices = _slice_keys(ds, frames)
            rec.keys = {keyword: _text(ds, keyword) for keyword in extra_keys}
    except InvalidDicomError:
        rec.reason = REASON_NOT_DICOM
    except Exception as exc:  # any parse failure of a damaged file: quarantine, go on
        rec.reason = f"unreadable DICOM ({_short_error(exc, path)})"
    return rec


def _is_trace(ds: pydicom.Dataset) -> bool:
    """True for a Philips isotropic diffusion image (direction "I", b > 0): a derived
    trace that dcm2niix takes out of the diffusion series (its "_ADC" file)."""
    element = ds.get(PHILIPS_DIFFUSION_DIRECTION)
    if element is None:
        return False
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        b_value = float(ds.get("DiffusionBValue") or 0)
    except (TypeError, ValueError):
        b_value = 0.0
    return str(value).strip().upper() == "I" and b_value > 0


def _read_header(fh: Any, tags: Sequence[str | int]) -> pydicom.Dataset:
    """The header (up to the pixel data) of a DICOM file, or of a raw dataset without
    preamble and file meta (old archives write them; dcm2niix reads the little-endian
    ones) or with meta but no preamble, which pydicom only parses when forced: a file is
    taken for one if it starts with a group 0002 or 0008 element and holds SOPClassUID,
    Modality or Rows. Raises InvalidDicomError otherwise."""
    try:
        return pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        fh.seek(0)
        if fh.read(2) not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
            raise
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True, specific_tags=tags)
        except Exception as exc:  # junk that merely starts like a dataset
            raise InvalidDicomError("not a DICOM dataset") from exc
        if not any(_text(ds, k) for k in ("SOPClassUID", "Modality", "Rows")):
            raise
        return ds


def _read_chunk(args: tuple[str, list[str], str, str, tuple[str, ...]]) -> list[FileRecord]:
    root, rels, patient_key, label_key, extra_keys = args
    return [read_file_record(root, rel, patient_key, label_key, extra_keys) for rel in rels]


def scan_files(
    dicom_root: str | os.PathLike,
    rels: Sequence[str],
    *,
    patient_key: str,
    label_key: str,
    extra_keys: Sequence[str] = (),
    threads: int = 1,
    progress: bool = True,
) -> list[FileRecord]:
    """`read_file_record` over `rels`, in `threads` processes; records in `rels` order."""
    extra_keys = tuple(extra_keys)
    root = os.path.abspath(dicom_root)
    n = len(rels)
    chunk = max(1, min(256, math.ceil(n / max(1, threads * 8))))
    chunks = [list(rels[i : i + chunk]) for i in range(0, n, chunk)]
    from tqdm import tqdm

    bar = tqdm(total=n, desc="index", unit="file", file=sys.stderr, disable=not progress)
    results: list[list[FileRecord]] = [[] for _ in chunks]
    try:
        if threads <= 1 or len(chunks) <= 1:
            for i, part in enumerate(chunks):
                results[i] = _read_chunk((root, part, patient_key, label_key, extra_keys))
                bar.update(len(part))
        else:
            with ProcessPoolExecutor(max_workers=threads) as pool:
                futures = {
                    pool.submit(_read_chunk, (root, part, patient_key, label_key, extra_keys)): i
                    for i, part in enumerate(chunks)
                }
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(len(chunks[i]))
    finally:
        bar.close()
    return [rec for part in results for rec in part]
