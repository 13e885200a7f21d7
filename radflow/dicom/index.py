"""Index a raw DICOM export: classify every file, group images into units, join labels.

`build_index` reads headers only (never pixel data), in parallel, and returns an
`IndexResult`: PHI-free tables for results/ (series, quarantine, annotations, summary) and
private tables that hold file paths (quarantine paths, the file list of each shard).

An *image unit* is what becomes one NIfTI image and one row of the series table: a single
SOP instance for projection modalities (`conventions.PROJECTION_MODALITIES`: DX, CR,
MG...), whose series often hold several unrelated views; for cross-sectional modalities
(CT, MR, PT...) one 3D stack of a series (`split_series`): localizers (ImageType
LOCALIZER) and slices in a minority orientation are left out with a reason in the
quarantine table, and a series whose slices repeat positions is split by echo number,
echo time, temporal position, trigger time, acquisition number or b-value into units
whose identifier is "<SeriesInstanceUID>/<key>=<value>" (hashed like any unit id).
Enhanced multi-frame files take part frame by frame, their positions and keys read from
the functional groups (header only); the private shard table names the frames of each
file that a unit uses (column `conventions.FRAMES`, "" for all).

Privacy rules enforced here: results tables and log text carry only pseudonyms
(`conventions.pseudonym`), counts and whitelisted acquisition values; file paths (folder
names of real exports are often patient names) and identifier values (patient ids,
accession numbers, UIDs) appear only in the private tables or nowhere. Error messages
about the labels table name the file, column and line, never a value.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.datadict import tag_for_keyword
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
REASON_LOCALIZER = "localizer excluded from its series (ImageType LOCALIZER)"
REASON_OFF_STACK = "orientation differs from the series' main stack (localizer or scout): excluded"
#: Reasons that end in file-specific details "(...)"; the summary counts them by prefix.
_DETAILED_REASONS = (
    "truncated file: pixel data incomplete",
    "pixel data too short for Rows x Columns",
    "multi-frame instance",
    "unreadable DICOM",
    REASON_LOCALIZER,
    REASON_OFF_STACK,
)

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
    # geometry and stack keys: localizer exclusion and splitting a series into stacks
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
#: (name used in unit ids, classic keyword, functional group macro, element in it).
STACK_KEYS = (
    ("stack", "", "FrameContentSequence", "StackID"),
    ("echo", "EchoNumbers", "", ""),
    ("te", "EchoTime", "MREchoSequence", "EffectiveEchoTime"),
    ("time", "TemporalPositionIdentifier", "FrameContentSequence", "TemporalPositionIndex"),
    ("trigger", "TriggerTime", "CardiacSynchronizationSequence",
     "NominalCardiacTriggerDelayTime"),
    ("acq", "AcquisitionNumber", "", ""),
    ("b", "DiffusionBValue", "MRDiffusionSequence", "DiffusionBValue"),
)  # fmt: skip
#: Slices of one stack whose positions along the normal differ by less are "the same".
SAME_POSITION_MM = 0.01
#: Direction cosines that differ by more belong to different orientations.
ORIENTATION_TOLERANCE = 1e-3

_SERIES_COLUMNS = [
    C.SERIES_PID,
    C.STUDY_PID,
    C.PATIENT_PID,
    C.LABEL,
    C.SHARD,
    C.MODALITY,
    "n_files",
    "rows",
    "columns",
    "photometric",
    "pixel_spacing_mm",
    "body_part",
    "view_position",
    "manufacturer",
]
_QUARANTINE_COLUMNS = [C.FILE_ID, C.SERIES_PID, C.REASON]
_QUARANTINE_PATH_COLUMNS = [C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]
_SHARD_COLUMNS = [C.SERIES_PID, C.MODALITY, C.PATH, C.FRAMES]
_ANNOTATION_COLUMNS = [C.SERIES_PID, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]


# ------------------------------------------------------------------- file records
@dataclass(frozen=True, slots=True)
class SliceKey:
    """What the index knows of one slice: a single-frame file, one frame of an enhanced
    multi-frame file, or a legacy multi-frame file as a whole (frame None)."""

    frame: int | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 cosines)
    position: tuple[float, ...] | None  # ImagePositionPatient (LPS mm)
    keys: tuple[tuple[str, str], ...] = ()  # (STACK_KEYS name, value) present


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
    n_frames: int = 1
    slices: list[SliceKey] = field(default_factory=list)


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
            for name, _, macro, keyword in STACK_KEYS:
                value = group_value(items, macro, keyword) if macro else None
                if value is not None and str(value).strip():
                    keys.append((name, str(value).strip()))
            out.append(SliceKey(frame, _vector(holder, "ImageOrientationPatient", 6),
                                _vector(holder, "ImagePositionPatient", 3), tuple(keys)))  # fmt: skip
        return out
    keys = tuple(
        (name, _text(ds, keyword)) for name, keyword, _, _ in STACK_KEYS
        if keyword and _text(ds, keyword)
    )  # fmt: skip
    return [
        SliceKey(None, _vector(ds, "ImageOrientationPatient", 6),
                 _vector(ds, "ImagePositionPatient", 3), keys)
    ]  # fmt: skip


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


def read_file_record(root: str, rel: str, patient_key: str, label_key: str) -> FileRecord:
    """Read one file's header (no pixels) and classify it.

    Inputs: the DICOM root, the file's path relative to it, and the keywords of the patient
    and label keys. Output: a `FileRecord` whose `reason` is empty for a usable image.
    """
    rec = FileRecord(path=rel)
    path = os.path.join(root, rel)
    tags = [*_INDEX_KEYWORDS, patient_key, label_key]
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
            rec.n_frames = frames
            rec.slices = _slice_keys(ds, frames)
    except InvalidDicomError:
        rec.reason = REASON_NOT_DICOM
    except Exception as exc:  # any parse failure of a damaged file: quarantine, go on
        rec.reason = f"unreadable DICOM ({_short_error(exc, path)})"
    return rec


def _read_header(fh: Any, tags: Sequence[str]) -> pydicom.Dataset:
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


def _read_chunk(args: tuple[str, list[str], str, str]) -> list[FileRecord]:
    root, rels, patient_key, label_key = args
    return [read_file_record(root, rel, patient_key, label_key) for rel in rels]


def list_files(dicom_root: str | os.PathLike) -> list[str]:
    """Every non-hidden file under `dicom_root`, as sorted POSIX paths relative to it.

    Hidden files and folders (name starting with ".") are skipped. Symbolic links to
    folders are followed once (a link loop is not descended twice).
    """
    root = os.path.abspath(dicom_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DICOM root {dicom_root} is not a folder")
    out: list[str] = []
    seen: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_folder = os.path.relpath(folder, root)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_folder == "." else os.path.join(rel_folder, name)
            if os.path.isfile(os.path.join(root, rel)):
                out.append(Path(rel).as_posix())
    return sorted(out)


def tree_fingerprint(dicom_root: str | os.PathLike, files: list[str] | None = None) -> str:
    """A short hash of every indexed file's relative path, size and modification time.

    Used as a Snakemake parameter of the index rule: adding, removing or replacing a file
    changes it and reruns the index, while an untouched tree reruns nothing. Costs one
    stat per file (about a second for 10^5 files), no reads. `files`: the tree's
    `list_files(dicom_root)` when the caller has it already.
    """
    import hashlib

    root = Path(dicom_root)
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for rel in list_files(root) if files is None else files:
        stat = (root / rel).stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def scan_files(
    dicom_root: str | os.PathLike,
    rels: Sequence[str],
    *,
    patient_key: str,
    label_key: str,
    threads: int = 1,
    progress: bool = True,
) -> list[FileRecord]:
    """`read_file_record` over `rels`, in `threads` processes; records in `rels` order."""
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
                results[i] = _read_chunk((root, part, patient_key, label_key))
                bar.update(len(part))
        else:
            with ProcessPoolExecutor(max_workers=threads) as pool:
                futures = {
                    pool.submit(_read_chunk, (root, part, patient_key, label_key)): i
                    for i, part in enumerate(chunks)
                }
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(len(chunks[i]))
    finally:
        bar.close()
    return [rec for part in results for rec in part]


# ------------------------------------------------------------------- tables in
def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV/TSV table with every cell as a stripped string ("" when empty).

    The separator is the one among tab, comma and semicolon that occurs most in the header
    line (ties: tab for .tsv/.tab/.txt, comma otherwise), so Excel's semicolon CSVs work.
    Strings, never numbers: accession numbers keep their leading zeros.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = fh.readline()
    default = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    counts = {sep: header.count(sep) for sep in ("\t", ",", ";")}
    best = max(counts.values())
    sep = default if best == 0 or counts[default] == best else max(counts, key=counts.get)
    table = pd.read_csv(
        path,
        sep=sep,
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        encoding="utf-8-sig",
    )
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip()) if len(table) else table


def _require_columns(table: pd.DataFrame, path: str | os.PathLike, columns: Iterable[str]) -> None:
    for column in columns:
        if column not in table.columns:
            present = ", ".join(repr(c) for c in table.columns)
            raise ValueError(
                f"{path}: no column {column!r} (columns present: {present}); "
                "check the label_key / label_column settings"
            )


def _line(row_index: int) -> int:
    """File line of a 0-based data row (line 1 is the header)."""
    return row_index + 2


def read_labels(
    labels_table: str | os.PathLike,
    *,
    label_key: str,
    label_column: str,
    positive_value: str,
) -> dict[str, int]:
    """{key value: 0/1} from the labels table.

    The `positive_value` (compared as stripped strings) maps to 1, every other non-empty
    value to 0. Raises ValueError, naming file, column and line but never a key value, on a
    missing column, no rows, an empty key or label, conflicting duplicate keys, or no
    positive row.
    """
    table = read_table(labels_table)
    _require_columns(table, labels_table, [label_key, label_column])
    if table.empty:
        raise ValueError(f"{labels_table}: the labels table has no rows")
    positive = str(positive_value).strip()
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for i, (key_value, raw) in enumerate(zip(table[label_key], table[label_column], strict=True)):
        if not key_value:
            raise ValueError(f"{labels_table}: empty {label_key!r} at line {_line(i)}")
        if not raw:
            raise ValueError(f"{labels_table}: empty {label_column!r} at line {_line(i)}")
        value = 1 if raw == positive else 0
        if key_value in labels and labels[key_value] != value:
            raise ValueError(
                f"{labels_table}: lines {first_line[key_value]} and {_line(i)} give conflicting "
                f"{label_column!r} values for the same {label_key!r}"
            )
        labels[key_value] = value
        first_line.setdefault(key_value, _line(i))
    if labels and not any(labels.values()):
        raise ValueError(
            f"{labels_table}: no row of column {label_column!r} equals the positive value "
            f"{positive!r}; check the positive_value setting"
        )
    return labels


@dataclass(frozen=True)
class Annotation:
    key: str
    row_px: float
    col_px: float
    diameter_mm: float
    line: int


def read_annotations(annotations_table: str | os.PathLike, *, label_key: str) -> list[Annotation]:
    """Lesion points keyed like the labels table: columns `label_key`, row_px, col_px
    (0-based pixel indices in the stored DICOM image, may be fractional) and diameter_mm.
    Raises ValueError naming file, column and line on a missing or invalid cell."""
    table = read_table(annotations_table)
    columns = [label_key, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]
    _require_columns(table, annotations_table, columns)
    out = []
    for i, row in enumerate(table[columns].itertuples(index=False, name=None)):
        if not row[0]:
            raise ValueError(f"{annotations_table}: empty {label_key!r} at line {_line(i)}")
        numbers = []
        for column, text in zip(columns[1:], row[1:], strict=True):
            try:
                x = float(text)
            except ValueError:
                x = math.nan
            if not math.isfinite(x) or x < 0 or (column == C.DIAMETER_MM and x == 0):
                raise ValueError(
                    f"{annotations_table}: {column!r} at line {_line(i)} is not a "
                    + ("positive" if column == C.DIAMETER_MM else "non-negative")
                    + " number"
                )
            numbers.append(x)
        out.append(Annotation(row[0], *numbers, line=_line(i)))
    return out


# --------------------------------------------------------------------- result
@dataclass
class IndexResult:
    """Tables produced by `build_index` (all pandas DataFrames of strings/ints).

    - series (results): one row per labelled unit, columns `_SERIES_COLUMNS`.
    - quarantine (results): file_id, series_pid, reason; one row per left-out file (a
      localizer left out of a series carries that series' pseudonym) and one per excluded
      unit (file_id empty).
    - quarantine_paths (PRIVATE): file_id, series_pid, path, reason; one row per left-out
      file, including every file of an excluded unit.
    - shard_files (PRIVATE): {shard: table series_pid, modality, path, frames}, every
      shard present; frames (`conventions.FRAMES`) lists the 0-based frames of a
      multi-frame file that the unit uses, "" for all frames or a single-frame file.
    - annotations (results): series_pid, row_px, col_px, diameter_mm.
    - summary: counts for the log (JSON-serialisable, PHI-free).
    """

    series: pd.DataFrame
    quarantine: pd.DataFrame
    quarantine_paths: pd.DataFrame
    shard_files: dict[int, pd.DataFrame]
    annotations: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self, results_dir: str | os.PathLike, private_dir: str | os.PathLike) -> list[Path]:
        """Write every table atomically; returns the paths written.

        results_dir: series.tsv, quarantine.tsv, annotations.tsv, summary.json.
        private_dir: quarantine_paths.tsv and index/<shard_name(k)>.tsv for every shard.
        A file whose content is unchanged is left untouched (same bytes, same mtime).
        """
        results, private = Path(results_dir), Path(private_dir)
        written = [
            write_tsv(self.series, results / C.SERIES_TABLE),
            write_tsv(self.quarantine, results / C.QUARANTINE_TABLE),
            write_tsv(self.annotations, results / C.ANNOTATIONS_TABLE),
            write_bytes_atomic(
                results / C.INDEX_SUMMARY,
                (json.dumps(self.summary, indent=2, sort_keys=True) + "\n").encode(),
            ),
            write_tsv(self.quarantine_paths, private / C.QUARANTINE_PATHS),
        ]
        for shard in sorted(self.shard_files):
            path = private / C.SHARD_INDEX_DIR / f"{C.shard_name(shard)}.tsv"
            written.append(write_tsv(self.shard_files[shard], path))
        return written

    def summary_text(self) -> str:
        """A few PHI-free log lines: counts only."""
        s = self.summary
        lines = [
            f"index: {s['n_files']} files, {s['n_image_files']} image instances, "
            f"{s['n_units_found']} image units found",
            f"index: {s['n_units']} labelled units kept ({s['n_positive']} positive, "
            f"{s['n_negative']} negative) from {s['n_patients']} patients and "
            f"{s['n_studies']} studies, in {s['n_shards']} shards",
        ]
        for reason, count in sorted(s["files_quarantined"].items()):
            lines.append(f"index: {count} files left out: {reason}")
        for reason, count in sorted(s["units_excluded"].items()):
            lines.append(f"index: {count} units excluded: {reason}")
        if s.get("n_series_split"):
            by_key = ", ".join(f"{n} by {k}" for k, n in s["units_from_split_series"].items())
            lines.append(f"index: {s['n_series_split']} series split into stacks ({by_key} units)")
        lines.append(
            f"index: {s['n_label_keys_unmatched']} of {s['n_label_keys']} label keys "
            "match no image unit"
        )
        if s["n_label_keys_with_several_patients"]:
            lines.append(
                f"index: WARNING {s['n_label_keys_with_several_patients']} label keys occur "
                f"with more than one {s['patient_key']}: check for merged patient records"
            )
        if s.get("annotations"):
            a = s["annotations"]
            lines.append(
                f"index: {a['rows_written']} annotation rows from {a['n_annotations']} "
                f"annotations ({a['unmatched']} match no image unit, {a['no_kept_2d_unit']} "
                f"match no kept 2D unit, {a['outside_image']} outside the image)"
            )
        return "\n".join(lines)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and os.replace, so a
    killed job never leaves a partial file; an identical existing file is left untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data:
            return path
    except (FileNotFoundError, IsADirectoryError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def tsv_bytes(table: pd.DataFrame) -> bytes:
    """Deterministic TSV encoding (LF line ends, UTF-8; undecodable file-name bytes kept)."""
    text = table.to_csv(sep="\t", index=False, lineterminator="\n")
    return text.encode("utf-8", "surrogateescape")


def write_tsv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(Path(path), tsv_bytes(table))


def read_shard_files(path: str | os.PathLike) -> pd.DataFrame:
    """Read a private shard table written by `IndexResult.write` (all strings).

    Columns: series_pid, modality, path, frames (`conventions.FRAMES`: the 0-based frames
    of a multi-frame file that belong to the unit, "" for all). Tables written before the
    frames column existed read with frames "" everywhere.
    """
    table = pd.read_csv(
        path,
        sep="\t",
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        encoding="utf-8",
        encoding_errors="surrogateescape",
    )
    if C.FRAMES not in table.columns:
        table[C.FRAMES] = ""
    return table


# ------------------------------------------------------------------ the index
class _Pseudonyms:
    """conventions.pseudonym with a collision check per kind."""

    def __init__(self, key: bytes):
        self.key = key
        self.seen: dict[str, dict[str, str]] = defaultdict(dict)

    def __call__(self, kind: str, identifier: str) -> str:
        # undecodable bytes in file names must not break hashing
        identifier = identifier.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        pid = C.pseudonym(self.key, kind, identifier)
        known = self.seen[kind].setdefault(pid, identifier)
        if known != identifier:
            raise RuntimeError(
                f"pseudonym collision: two distinct {kind!r} identifiers map to {pid}; "
                "raise conventions.PSEUDONYM_HEX_CHARS"
            )
        return pid


@dataclass
class ImageUnit:
    """One future NIfTI image: its identifier (hashed into series_pid), files, the frames
    of each multi-frame file that belong to it (path -> `conventions.FRAMES` text, absent
    = all), the keys that split its series ("echo", "time/acq"...; "" if not split) and
    why it cannot be used ("" if it can)."""

    unit_id: str
    files: list[FileRecord]
    frames: dict[str, str] = field(default_factory=dict)
    split_by: str = ""
    problem: str = ""


def _normal(orientation: Sequence[float]) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _positions_unique(slices: Sequence[tuple[FileRecord, SliceKey]], normal: np.ndarray) -> bool:
    along = [round(float(np.dot(sk.position, normal)) / SAME_POSITION_MM) for _, sk in slices]
    return len(set(along)) == len(along)


def split_series(
    series_uid: str, files: Sequence[FileRecord]
) -> tuple[list[ImageUnit], list[tuple[FileRecord, str]]]:
    """The image units of one cross-sectional series, and the (file, reason) pairs left out.

    1. Slices whose ImageType contains LOCALIZER are left out (a series of localizers only
       becomes one unit that fails with a reason). 2. When more than half of the remaining
       slices share one orientation, slices with another orientation (scouts, a reformat
       slipped into the series) are left out. 3. When slices repeat positions along the
       normal, the series is split by the first `STACK_KEYS` (stack, echo, echo time,
       temporal position, trigger time, acquisition number, b-value) that vary, keys being
       added in that order (a key is skipped if it would leave a stack of one slice) until
       every stack has distinct positions; the unit id is "<series uid>/<key>=<value>/...".
       If no keys separate them, the series stays one unit (conversion rejects it).
    Multi-frame files take part frame by frame; a file partly used lists its frames.
    Frames of an enhanced file with several StackIDs are split by stack first (unit id
    "<series uid>/stack=<id>/..."), each stack then handled as above.
    """
    slices = [(rec, sk) for rec in files for sk in rec.slices]
    by_stack: dict[str, list[tuple[FileRecord, SliceKey]]] = defaultdict(list)
    for rec, sk in slices:
        by_stack[dict(sk.keys).get("stack", "")].append((rec, sk))
    if len(by_stack) == 1:
        return _split_slices(series_uid, slices)
    units, left_out = [], []
    for stack, members in sorted(by_stack.items()):
        found, lost = _split_slices(f"{series_uid}/stack={stack}", members)
        units += found
        left_out += lost
    for unit in units:
        unit.split_by = "/".join(["stack", *filter(None, [unit.split_by])])
    return units, left_out


def _split_slices(
    series_uid: str, slices: Sequence[tuple[FileRecord, SliceKey]]
) -> tuple[list[ImageUnit], list[tuple[FileRecord, str]]]:
    """`split_series` for the slices of one stack; unit ids start with `series_uid`."""
    files = list({rec.path: rec for rec, _ in slices}.values())
    left_out: dict[str, list[tuple[FileRecord, SliceKey, str]]] = defaultdict(list)
    keep = []
    for rec, sk in slices:
        if "LOCALIZER" in rec.image_type.split("\\"):
            left_out[rec.path].append((rec, sk, REASON_LOCALIZER))
        else:
            keep.append((rec, sk))
    if not keep:
        return [ImageUnit(series_uid, list(files), problem="localizer series (every image "
                          "has ImageType LOCALIZER)")], []  # fmt: skip
    geometric = all(sk.orientation is not None and sk.position is not None for _, sk in keep)
    normal = None
    if geometric:
        groups: list[list[tuple[FileRecord, SliceKey]]] = []
        for item in keep:
            for group in groups:
                if np.abs(np.subtract(group[0][1].orientation, item[1].orientation)).max() < (
                    ORIENTATION_TOLERANCE
                ):
                    group.append(item)
                    break
            else:
                groups.append([item])
        main = max(groups, key=len)
        if len(groups) > 1 and 2 * len(main) > len(keep):
            for group in groups:
                if group is not main:
                    for rec, sk in group:
                        left_out[rec.path].append((rec, sk, REASON_OFF_STACK))
            keep, groups = main, [main]
        # several orientations and none in the majority: left to conversion to reject
        normal = _normal(main[0][1].orientation) if len(groups) == 1 else None
    stacks = {(): keep}
    used: list[str] = []
    if normal is not None and not _positions_unique(keep, normal):
        for name, *_ in STACK_KEYS[1:]:  # stacks are split already
            if len({dict(sk.keys).get(name, "") for _, sk in keep}) < 2:
                continue
            candidate: dict[tuple[str, ...], list] = defaultdict(list)
            for rec, sk in keep:
                values = dict(sk.keys)
                candidate[tuple(values.get(n, "") for n in [*used, name])].append((rec, sk))
            if min(len(v) for v in candidate.values()) < 2:
                continue
            used.append(name)
            stacks = dict(candidate)
            if all(_positions_unique(v, normal) for v in stacks.values()):
                break
        else:
            stacks, used = {(): keep}, []
    units = []
    for values, members in sorted(stacks.items()):
        unit_id = "/".join([series_uid, *(f"{n}={v}" for n, v in zip(used, values, strict=True))])
        by_file: dict[str, list[int | None]] = defaultdict(list)
        records: dict[str, FileRecord] = {}
        for rec, sk in members:
            by_file[rec.path].append(sk.frame)
            records[rec.path] = rec
        frames = {}
        for path, indices in by_file.items():
            rec = records[path]
            if rec.n_frames > 1 and None not in indices and len(indices) < rec.n_frames:
                frames[path] = " ".join(str(i) for i in sorted(indices))
        units.append(ImageUnit(unit_id, list(records.values()), frames, "/".join(used)))
    rows = []
    for _path, items in sorted(left_out.items()):
        rec, reason = items[0][0], items[0][2]
        if rec.n_frames > 1 and items[0][1].frame is not None:
            reason = f"{reason} ({len(items)} of {rec.n_frames} frames)"
        rows.append((rec, reason))
    return units, rows


def _check_keyword(keyword: str, what: str) -> None:
    if tag_for_keyword(keyword) is None:
        raise ValueError(f"{what} {keyword!r} is not a DICOM keyword (e.g. 'AccessionNumber')")


def build_index(
    dicom_root: str | os.PathLike,
    labels_table: str | os.PathLike,
    *,
    label_key: str = "AccessionNumber",
    label_column: str = "label",
    positive_value: str = "1",
    patient_key: str = "PatientID",
    annotations_table: str | os.PathLike | None = None,
    key: bytes,
    n_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> IndexResult:
    """Index the DICOM files under `dicom_root` and join the labels.

    Inputs:
      dicom_root: folder tree of DICOM files (any names, any nesting; hidden files skipped).
      labels_table: CSV/TSV with columns `label_key` (a DICOM keyword whose header value
        identifies the labelled entity, e.g. AccessionNumber) and `label_column`.
      positive_value: label text that means 1; any other non-empty text means 0.
      patient_key: DICOM keyword identifying the patient (for patient-level splits).
      annotations_table: optional CSV/TSV keyed by `label_key` with row_px, col_px
        (0-based pixels of the stored image) and diameter_mm. An annotation whose key
        matches several 2D units (e.g. all views of one study) is attached to each of them;
        annotations matching only 3D units, or outside the image, are counted, not kept.
      key: pseudonymisation key (conventions.load_or_create_key).
      n_shards: number of shards; each unit goes to shard_of(series_pid, n_shards).
      threads: worker processes for header reading.
    Output: an `IndexResult` (call `.write(results_dir, private_dir)`).
    Raises ValueError on a malformed labels/annotations table, RuntimeError on a
    pseudonym collision.
    """
    _check_keyword(label_key, "label_key")
    _check_keyword(patient_key, "patient_key")
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    labels = read_labels(
        labels_table, label_key=label_key, label_column=label_column, positive_value=positive_value
    )
    annotations = (
        read_annotations(annotations_table, label_key=label_key) if annotations_table else []
    )
    rels = list_files(dicom_root)
    records = scan_files(
        dicom_root,
        rels,
        patient_key=patient_key,
        label_key=label_key,
        threads=threads,
        progress=progress,
    )
    pseudo = _Pseudonyms(key)
    file_id = {rec.path: pseudo("file", rec.path) for rec in records}

    # Rows (file_id, series_pid, path, reason). Files of excluded units go only to the
    # private table; results list such a unit once, with an empty file_id.
    quarantine: list[tuple[str, str, str, str]] = []
    unit_quarantine: list[tuple[str, str, str, str]] = []
    unit_file_quarantine: list[tuple[str, str, str, str]] = []
    for rec in records:
        if rec.reason:
            quarantine.append((file_id[rec.path], "", rec.path, rec.reason))

    # Duplicates: keep the copy with the first path (records are in sorted path order).
    kept: dict[str, FileRecord] = {}
    duplicates: list[FileRecord] = []
    for rec in records:
        if rec.reason:
            continue
        if rec.sop_uid in kept:
            duplicates.append(rec)
        else:
            kept[rec.sop_uid] = rec

    by_series: dict[str, list[FileRecord]] = defaultdict(list)
    for rec in kept.values():
        by_series[rec.series_uid].append(rec)

    # Image units. Projection series split into instances; cross-sectional series lose
    # their localizers and split into stacks (echoes, time points...), see split_series.
    units: list[ImageUnit] = []
    for series_uid, files in by_series.items():
        modalities = {f.modality for f in files}
        if len(modalities) > 1:
            problem = "Modality differs between files of the series"
            units.append(ImageUnit(series_uid, files, problem=problem))
        elif modalities.pop() in C.PROJECTION_MODALITIES:
            if len(files) > 1:
                units.extend(ImageUnit(f"{series_uid}/{f.sop_uid}", [f]) for f in files)
            else:
                units.append(ImageUnit(series_uid, files))
        else:
            found, left_out = split_series(series_uid, files)
            units.extend(found)
            series_pid = pseudo("ser", series_uid)
            for rec, reason in left_out:
                quarantine.append((file_id[rec.path], series_pid, rec.path, reason))
    split_counts = Counter(u.split_by for u in units if u.split_by)

    unit_of_sop: dict[str, str] = {}
    series_rows: list[dict[str, Any]] = []
    shard_rows: dict[int, list[tuple[str, str, str, str]]] = {k: [] for k in range(n_shards)}
    excluded: Counter[str] = Counter()
    label_keys_used: set[str] = set()
    units_of_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    # One labelled key seen with several patients (merged records?) can leak across splits.
    patients_of_key: dict[str, set[str]] = defaultdict(set)
    for unit in units:
        files = sorted(unit.files, key=lambda f: f.path)
        series_pid = pseudo("ser", unit.unit_id)
        for f in files:
            unit_of_sop.setdefault(f.sop_uid, series_pid)
        reason = unit.problem
        if not reason:
            reason = _unit_problem(files, label_key, patient_key)
        label_value = files[0].label_value
        if not reason and label_value not in labels:
            reason = REASON_NO_LABEL
        if reason:
            excluded[reason] += 1
            unit_quarantine.append(("", series_pid, "", reason))
            unit_file_quarantine.extend(
                (file_id[f.path], series_pid, f.path, reason) for f in files
            )
            continue
        label_keys_used.add(label_value)
        first = files[0]
        shard = C.shard_of(series_pid, n_shards)
        row = {
            C.SERIES_PID: series_pid,
            C.STUDY_PID: pseudo("stu", first.study_uid),
            C.PATIENT_PID: pseudo("pat", first.patient),
            C.LABEL: labels[label_value],
            C.SHARD: shard,
            C.MODALITY: first.modality,
            "n_files": len(files),
            "rows": first.rows,
            "columns": first.columns,
            "photometric": first.photometric,
            "pixel_spacing_mm": first.pixel_spacing,
            "body_part": first.body_part,
            "view_position": first.view_position,
            "manufacturer": first.manufacturer,
        }
        series_rows.append(row)
        shard_rows[shard].extend(
            (series_pid, first.modality, f.path, unit.frames.get(f.path, "")) for f in files
        )
        if first.modality in C.PROJECTION_MODALITIES:
            units_of_key[label_value].append(row)
        patients_of_key[label_value].add(row[C.PATIENT_PID])

    for rec in duplicates:
        quarantine.append(
            (file_id[rec.path], unit_of_sop.get(rec.sop_uid, ""), rec.path, REASON_DUPLICATE)
        )

    # Keys of units that were found at all, for the "label matches no unit" count.
    found_keys = {unit.files[0].label_value for unit in units}
    annotation_rows, annotation_counts = _join_annotations(
        annotations, units_of_key, {f.label_value for unit in units for f in unit.files}
    )

    series = pd.DataFrame(series_rows, columns=_SERIES_COLUMNS)
    series = series.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    columns = [C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]
    order = [C.SERIES_PID, C.FILE_ID, C.REASON]
    q_private = pd.DataFrame(quarantine + unit_file_quarantine, columns=columns)
    quarantine_paths = q_private.sort_values(order, kind="stable")[_QUARANTINE_PATH_COLUMNS]
    quarantine_paths = quarantine_paths.reset_index(drop=True)
    q_results = pd.DataFrame(quarantine + unit_quarantine, columns=columns)
    quarantine_table = q_results.sort_values(order, kind="stable")[_QUARANTINE_COLUMNS]
    quarantine_table = quarantine_table.reset_index(drop=True)
    shard_files = {
        k: pd.DataFrame(sorted(rows), columns=_SHARD_COLUMNS) for k, rows in shard_rows.items()
    }
    annotation_table = pd.DataFrame(annotation_rows, columns=_ANNOTATION_COLUMNS)
    annotation_table = annotation_table.sort_values(_ANNOTATION_COLUMNS, kind="stable")
    annotation_table = annotation_table.reset_index(drop=True)

    file_reasons = Counter(reason_category(row[3]) for row in quarantine if row[0])
    summary: dict[str, Any] = {
        "n_files": len(records),
        "n_image_files": sum(1 for rec in records if not rec.reason),
        "files_quarantined": dict(sorted(file_reasons.items())),
        "n_units_found": len(units),
        "units_excluded": dict(sorted(excluded.items())),
        "n_series_split": len({u.unit_id.split("/")[0] for u in units if u.split_by}),
        "units_from_split_series": dict(sorted(split_counts.items())),
        "n_units": len(series),
        "n_patients": int(series[C.PATIENT_PID].nunique()),
        "n_studies": int(series[C.STUDY_PID].nunique()),
        "n_positive": int((series[C.LABEL] == 1).sum()),
        "n_negative": int((series[C.LABEL] == 0).sum()),
        "units_by_modality": {
            str(k): int(v) for k, v in series[C.MODALITY].value_counts().sort_index().items()
        },
        "n_label_keys": len(labels),
        "n_label_keys_unmatched": len(set(labels) - found_keys),
        "n_label_keys_used": len(label_keys_used),
        "n_label_keys_with_several_patients": sum(len(p) > 1 for p in patients_of_key.values()),
        "n_shards": n_shards,
        "units_per_shard": [len({r[0] for r in shard_rows[k]}) for k in range(n_shards)],
        "label_key": label_key,
        "patient_key": patient_key,
        "positive_value": str(positive_value).strip(),
    }
    if annotations_table:
        summary["annotations"] = annotation_counts
    return IndexResult(
        series=series,
        quarantine=quarantine_table,
        quarantine_paths=quarantine_paths,
        shard_files=shard_files,
        annotations=annotation_table,
        summary=summary,
    )


def reason_category(reason: str) -> str:
    """`reason` without its file-specific details, for counting."""
    return next((p for p in _DETAILED_REASONS if reason.startswith(p)), reason)


def _unit_problem(files: Sequence[FileRecord], label_key: str, patient_key: str) -> str:
    """Why a unit cannot be used ("" if it can): identifiers missing or not constant."""
    patients = {f.patient for f in files}
    if "" in patients:
        return f"missing {patient_key} (a patient-level split cannot be guaranteed)"
    if len(patients) > 1:
        return f"{patient_key} differs between files of the unit"
    if len({f.study_uid for f in files}) > 1:
        return "StudyInstanceUID differs between files of the unit"
    label_values = {f.label_value for f in files}
    if len(label_values) > 1:
        return f"{label_key} differs between files of the unit"
    if "" in label_values:
        return f"no {label_key} in the DICOM header"
    return ""


def _join_annotations(
    annotations: Sequence[Annotation],
    units_of_key: dict[str, list[dict[str, Any]]],
    all_keys: set[str],
) -> tuple[list[tuple[str, float, float, float]], dict[str, int]]:
    rows = []
    counts = Counter(n_annotations=len(annotations), rows_written=0, unmatched=0,
                     no_kept_2d_unit=0, outside_image=0)  # fmt: skip
    for ann in annotations:
        targets = units_of_key.get(ann.key, [])
        if not targets:
            counts["no_kept_2d_unit" if ann.key in all_keys else "unmatched"] += 1
            continue
        for unit in targets:
            if ann.row_px > unit["rows"] - 1 or ann.col_px > unit["columns"] - 1:
                counts["outside_image"] += 1
                continue
            rows.append((unit[C.SERIES_PID], ann.row_px, ann.col_px, ann.diameter_mm))
            counts["rows_written"] += 1
    return rows, dict(counts)
