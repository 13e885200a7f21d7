"""Images-table input: public data sets as they are distributed, not as DICOM.

A CSV/TSV table lists one image file per row: the patient, optionally the case (study)
and the channel (``flair``, ``t1c``...), the file's path (relative to the table), and the
target (a label value, and/or a mask file). NIfTI (.nii, .nii.gz), MetaImage (.mha,
.mhd), NRRD (.nrrd, .nhdr) are volumes whose geometry (spacing, origin, direction) comes
from the file; PNG, JPEG and TIFF are 2D images with a nominal 1 mm pixel (they carry no
patient geometry; 16-bit PNG/TIFF stay 16-bit). Volumes are read with SimpleITK, planar
images with Pillow.

The same semantics as a DICOM tree's index (`radflow.dicom.index`) and conversion:

- `build_table_index`: reads the table and every file's *header* (in parallel), groups
  rows into cases (the rows of one case are its channels), pseudonymises the patient and
  case ids with the study key, quarantines what cannot be used with the reason (a file
  that is missing, unreadable or of an unsupported format; a case without one of the
  table's channels or with a channel twice; channels of different dimensionality or, for
  planar images, pixel size; a mask whose grid differs from its image's), deals cases to
  shards by pseudonym hash, and returns an `IndexResult` with the same tables as the DICOM
  index. Only pseudonyms, counts and whitelisted geometry reach `results/`; paths and ids
  only the private tables.
- `convert_table_shard`: one NIfTI per case in the converted shard folder, the channels
  along the 4th axis (in the table's channel order, the reference channel's grid: the
  others are resampled onto it, linearly), a mask beside it (``<pid>_mask.nii.gz``, on
  the same grid, exact labels), a PHI-free sidecar (format, channels, what was resampled)
  and the convert stage's manifest. Preprocess, split and training then run unchanged.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.cases import (  # noqa: F401  (read_volume: re-exported)
    DIRECTION_TOL,
    ORIGIN_TOL_MM,
    SPACING_TOL_MM,
    label_dtype,
    mask_onto,
    ras_affine,
    read_volume,
    stack_channels,
    write_case,
)
from radflow.dicom.index import IndexResult
from radflow.files import files_fingerprint
from radflow.labels import _line, _require_columns
from radflow.lesions import (  # noqa: F401  (LESION_COLUMNS, LESIONS_TABLE: re-exported)
    EXCLUDED_LESIONS_TABLE,
    LESION_COLUMNS,
    LESIONS_TABLE,
    lesion_frame,
    read_lesion_rows,
)
from radflow.tables import read_table, read_tsv, write_tsv

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
PLANAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ROUTE_TABLE = "images_table"
# private shard tables: the channel name of an image row, its role (image or mask)
CHANNEL, ROLE, ROLE_IMAGE, ROLE_MASK = C.CHANNEL, C.ROLE, C.ROLE_IMAGE, C.ROLE_MASK

REASON_MISSING_FILE = "file not found"
REASON_UNSUPPORTED = "unsupported image format"
REASON_UNREADABLE = "unreadable image"
REASON_MISSING_CHANNEL = "missing channel"
REASON_DUPLICATE_CHANNEL = "channel listed twice"
REASON_CHANNEL_GRID = "channel grid differs from the reference channel's"
REASON_MASK_GRID = "mask grid differs from its image's"
REASON_NO_LABEL = "no label in the images table"
REASON_PATIENT_DIFFERS = "patient differs between rows of the case"
REASON_LABEL_DIFFERS = "label differs between rows of the case"

_SHARD_COLUMNS = [C.SERIES_PID, C.MODALITY, CHANNEL, ROLE, C.PATH]
_DETAILED = (REASON_UNREADABLE, REASON_UNSUPPORTED, REASON_MISSING_CHANNEL, REASON_CHANNEL_GRID,
             REASON_MASK_GRID)  # fmt: skip


@dataclass(frozen=True)
class TableColumns:
    """Column names of an images table (config `data.columns`); empty = not used."""

    patient: str = "patient_id"
    path: str = "path"
    case: str = "case_id"  # optional: absent -> one case per row (per patient with channels)
    channel: str = "channel"  # optional: absent -> single-channel cases
    label: str = "label"
    mask: str = "mask"  # optional: a label map per case (segmentation)
    modality: str = "modality"  # optional: else data.modality

    @classmethod
    def from_config(cls, cfg: dict | None) -> TableColumns:
        return cls(**(cfg or {}))


# ---------------------------------------------------------------- file headers
@dataclass(frozen=True)
class ImageInfo:
    """What the index needs of an image file, read from its header only."""

    ndim: int  # spatial dimensions: 2 (planar) or 3
    size: tuple[int, ...]  # x, y[, z] (columns, rows[, slices])
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major ndim x ndim
    components: int  # samples per pixel (3 for RGB)
    pixel_type: str
    planar: bool  # PNG/JPEG/TIFF: geometry nominal

    def same_grid(self, other: ImageInfo) -> bool:
        if self.ndim != other.ndim or self.size != other.size:
            return False
        return (
            np.allclose(self.spacing, other.spacing, atol=SPACING_TOL_MM)
            and np.allclose(self.origin, other.origin, atol=ORIGIN_TOL_MM)
            and np.allclose(self.direction, other.direction, atol=DIRECTION_TOL)
        )

    def describe(self) -> str:
        size = "x".join(map(str, self.size))
        spacing = "x".join(f"{v:.3g}" for v in self.spacing)
        return f"{size} voxels at {spacing} mm"


def image_kind(path: str) -> str:
    """ "volume", "planar", or "" for an unsupported file name."""
    name = path.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(PLANAR_SUFFIXES):
        return "planar"
    return ""


def _short(exc: BaseException, secrets: list[str]) -> str:
    """An exception as one line with file paths (which may name patients) removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "<file>")
    return f"{type(exc).__name__}: {text[:200]}"


def read_info(path: str) -> ImageInfo:
    """Header of one image file (no pixel data). Raises on unreadable files."""
    if image_kind(path) == "planar":
        from PIL import Image

        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ValueError(f"{im.n_frames}-page image: one 2D image per file is needed")
            components = len(im.getbands())
            return ImageInfo(2, tuple(im.size), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0),
                             components, im.mode, True)  # fmt: skip
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = tuple(int(v) for v in reader.GetSize())
    if len(size) > 3 or len(size) < 2:
        raise ValueError(f"{len(size)}D image: 2D or 3D images are needed")
    ndim = 2 if len(size) == 2 or size[2] == 1 else 3  # one slice: a 2D image
    return ImageInfo(
        ndim,
        size,
        tuple(round(float(v), 6) for v in reader.GetSpacing()),
        tuple(float(v) for v in reader.GetOrigin()),
        tuple(float(v) for v in reader.GetDirection()),
        int(reader.GetNumberOfComponents()),
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        False,
    )


def _info_job(path: str) -> tuple[str, ImageInfo | None, str]:
    kind = image_kind(path)
    if not kind:
        suffixes = ", ".join(VOLUME_SUFFIXES + PLANAR_SUFFIXES)
        return path, None, f"{REASON_UNSUPPORTED} (use one of {suffixes})"
    if not os.path.isfile(path):
        return path, None, REASON_MISSING_FILE
    try:
        return path, read_info(path), ""
    except Exception as exc:  # one bad file must not stop the index
        return path, None, f"{REASON_UNREADABLE} ({_short(exc, [path, os.path.basename(path)])})"


def read_infos(paths: list[str], threads: int = 1, progress: bool = True) -> dict[str, tuple]:
    """{path: (ImageInfo or None, reason)} for every path, read in `threads` processes."""
    from tqdm import tqdm

    out: dict[str, tuple] = {}
    bar = tqdm(total=len(paths), desc="index", unit="file", file=sys.stderr, mininterval=2,
               disable=not progress)  # fmt: skip
    if threads > 1 and len(paths) > 64:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            chunk = max(1, len(paths) // (threads * 16))
            for path, info, reason in pool.map(_info_job, paths, chunksize=chunk):
                out[path] = (info, reason)
                bar.update(1)
    else:
        for path in paths:
            _, info, reason = _info_job(path)
            out[path] = (info, reason)
            bar.update(1)
    bar.close()
    return out


# --------------------------------------------------------------------- the index
@dataclass
class _Row:
    line: int
    patient: str
    case: str
    channel: str
    path: str  # as written in the table (relative to the table's folder, or absolute)
    label: str
    mask: str
    modality: str


@dataclass
class _Case:
    case: str
    rows: list[_Row] = field(default_factory=list)


def table_root(images_table: str | os.PathLike) -> str:
    """Folder that the table's relative paths start from: the table's own folder."""
    return os.path.dirname(os.path.abspath(images_table))


def referenced_files(images_table: str | os.PathLike, columns: TableColumns) -> list[str]:
    """Every image and mask path the table names, relative to `table_root` (for the
    workflow's fingerprint of the input data)."""
    table = read_table(images_table)
    paths = [p for p in table.get(columns.path, []) if p]
    if columns.mask in table.columns:
        paths += [p for p in table[columns.mask] if p]
    return sorted(set(paths))


def table_fingerprint(images_table: str | os.PathLike, columns: TableColumns) -> str:
    """Hash of (path, size, mtime) of every file the table names: a replaced image
    reruns the index even though the table itself did not change."""
    return files_fingerprint(table_root(images_table), referenced_files(images_table, columns))


def _read_rows(images_table, columns: TableColumns, modality: str,
               need_label: bool | None) -> list[_Row]:  # fmt: skip
    table = read_table(images_table)
    if need_label is None:  # a table of masks is a segmentation study: labels optional
        need_label = columns.mask not in table.columns
    required = [columns.patient, columns.path] + ([columns.label] if need_label else [])
    _require_columns(table, images_table, required,
                     "data.columns (patient, path) and data.label_column")  # fmt: skip
    if table.empty:
        raise ValueError(f"{images_table}: the images table has no rows")
    has = set(table.columns)
    rows = []
    for i, record in enumerate(table.to_dict("records")):
        patient, path = record[columns.patient], record[columns.path]
        if not patient:
            raise ValueError(f"{images_table}: empty {columns.patient!r} at line {_line(i)}")
        if not path:
            raise ValueError(f"{images_table}: empty {columns.path!r} at line {_line(i)}")
        channel = record[columns.channel] if columns.channel in has else ""
        if columns.case in has:
            case = record[columns.case]
            if not case:
                raise ValueError(f"{images_table}: empty {columns.case!r} at line {_line(i)}")
        elif columns.channel in has:
            case = patient  # channels without a case column: one case per patient
        else:
            case = f"{patient}\0{path}"  # one case per row
        rows.append(
            _Row(
                line=_line(i),
                patient=patient,
                case=case,
                channel=channel,
                path=path,
                label=record.get(columns.label, "") if columns.label in has else "",
                mask=record.get(columns.mask, "") if columns.mask in has else "",
                modality=(record.get(columns.modality, "") if columns.modality in has else "")
                or modality,
            )  # fmt: skip
        )
    if columns.channel in has and any(not r.channel for r in rows):
        line = next(r.line for r in rows if not r.channel)
        raise ValueError(f"{images_table}: empty {columns.channel!r} at line {line}")
    return rows


def _channel_order(rows: list[_Row], reference_channel: str | None, images_table) -> list[str]:
    """The table's channels in order of first appearance, the reference channel first."""
    channels = list(dict.fromkeys(r.channel for r in rows))
    if channels == [""]:
        if reference_channel:
            raise ValueError(
                f"data.reference_channel is {reference_channel!r} but {images_table} has no "
                "channel column; remove the setting or add the column"
            )
        return channels
    if reference_channel:
        if reference_channel not in channels:
            raise ValueError(
                f"data.reference_channel {reference_channel!r} is not a channel of "
                f"{images_table} (channels: {', '.join(channels)})"
            )
        channels.remove(reference_channel)
        channels.insert(0, reference_channel)
    return channels


def build_table_index(
    images_table: str | os.PathLike,
    *,
    columns: TableColumns = TableColumns(),
    positive_value: str = "1",
    modality: str = "OT",
    reference_channel: str | None = None,
    key: bytes,
    n_shards: int,
    threads: int = 1,
    need_label: bool | None = None,
    lesions_table: str | os.PathLike | None = None,
    excluded_lesions_table: str | os.PathLike | None = None,
    progress: bool = True,
) -> IndexResult:
    """Index an images table: the DICOM index's tables, for image files (module docstring).

    positive_value: label text meaning 1 (any other non-empty text is 0).
    modality: the images' modality where the table has no modality column (CT, MR, DX,
      OT...): it picks the intensity normalisation of preprocess.
    reference_channel: the channel whose grid the others are resampled onto (default:
      the first channel of the table).
    need_label: whether every case needs a label (classification does); None (the
      default): unless the table has a mask column (a segmentation study), where a
      label column is optional and a case without a label has label -1.
    lesions_table: optional CSV/TSV of lesion centres (localisation targets), one row per
      lesion: the case column (data.columns.case; the patient column where the images
      table has no case column) and coordX, coordY, coordZ (world mm, LPS, as LUNA16)
      and diameter_mm. Joined to the cases into `IndexResult.extra[LESIONS_TABLE]`.
    excluded_lesions_table: optional, the same form: findings that count neither as hit
      nor as false positive (LUNA16's annotations_excluded.csv), into
      `IndexResult.extra[EXCLUDED_LESIONS_TABLE]`.
    Raises ValueError, naming the table, column and line (never a value), on a malformed
    table; files and cases that cannot be used are quarantined, not raised.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    rows = _read_rows(images_table, columns, modality, need_label)
    if need_label is None:
        need_label = not any(row.mask for row in rows)
    channels = _channel_order(rows, reference_channel, images_table)
    root = table_root(images_table)
    absolute = lambda rel: rel if os.path.isabs(rel) else os.path.join(root, rel)  # noqa: E731
    paths = sorted({r.path for r in rows} | {r.mask for r in rows if r.mask})
    infos = read_infos([absolute(p) for p in paths], threads=threads, progress=progress)
    info_of = {p: infos[absolute(p)] for p in paths}
    positive = str(positive_value).strip()

    pseudo = C.Pseudonyms(key)
    cases: dict[str, _Case] = {}
    for row in rows:
        cases.setdefault(row.case, _Case(row.case)).rows.append(row)

    file_q: list[tuple[str, str, str, str]] = []  # file_id, series_pid, path, reason
    unit_q: list[tuple[str, str, str, str]] = []
    unit_file_q: list[tuple[str, str, str, str]] = []
    series_rows: list[dict[str, Any]] = []
    shard_rows: dict[int, list[tuple[str, ...]]] = {k: [] for k in range(n_shards)}
    excluded: Counter[str] = Counter()
    bad_files: set[str] = set()
    for case in cases.values():
        series_pid = pseudo("ser", case.case)
        case_paths = [r.path for r in case.rows] + sorted({r.mask for r in case.rows if r.mask})
        for path in case_paths:
            info, reason = info_of[path]
            if reason and path not in bad_files:
                bad_files.add(path)
                file_q.append((pseudo("file", path), series_pid, path, reason))
        reason = _case_problem(case, channels, info_of, need_label)
        if reason:
            excluded[_category(reason)] += 1
            unit_q.append(("", series_pid, "", reason))
            unit_file_q.extend(
                (pseudo("file", p), series_pid, p, reason) for p in case_paths if p not in bad_files
            )
            continue
        by_channel = {r.channel: r for r in case.rows}
        reference = by_channel[channels[0]]
        info = info_of[reference.path][0]
        shard = C.shard_of(series_pid, n_shards)
        label = reference.label
        series_rows.append(
            {
                C.SERIES_PID: series_pid,
                C.STUDY_PID: pseudo("stu", case.case),
                C.PATIENT_PID: pseudo("pat", reference.patient),
                C.LABEL: (1 if label == positive else 0) if label else -1,
                C.SHARD: shard,
                C.MODALITY: reference.modality,
                "n_files": len(case_paths),
                "rows": info.size[1],
                "columns": info.size[0],
                "photometric": "",
                "pixel_spacing_mm": "\\".join(f"{v:g}" for v in info.spacing[:2][::-1]),
                "body_part": "",
                "view_position": "",
                "manufacturer": "",
                "channels": " ".join(c for c in channels if c),
                "source_format": _format_name(reference.path),
            }
        )
        for ch in channels:
            r = by_channel[ch]
            shard_rows[shard].append((series_pid, r.modality, ch, ROLE_IMAGE, r.path))
        mask = next((r.mask for r in case.rows if r.mask), "")
        if mask:
            shard_rows[shard].append((series_pid, reference.modality, "", ROLE_MASK, mask))

    series_columns = [C.SERIES_PID, C.STUDY_PID, C.PATIENT_PID, C.LABEL, C.SHARD, C.MODALITY,
                      "n_files", "rows", "columns", "photometric", "pixel_spacing_mm",
                      "body_part", "view_position", "manufacturer", "channels",
                      "source_format"]  # fmt: skip
    series = pd.DataFrame(series_rows, columns=series_columns)
    series = series.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    names = [C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]
    order = [C.SERIES_PID, C.FILE_ID, C.REASON]
    q_private = pd.DataFrame(file_q + unit_file_q, columns=names).sort_values(order, kind="stable")
    q_results = pd.DataFrame(file_q + unit_q, columns=names).sort_values(order, kind="stable")
    shard_files = {
        # by case; within a case in channel order, the reference first, then the mask
        k: pd.DataFrame(sorted(v, key=lambda r: r[0]), columns=_SHARD_COLUMNS)
        for k, v in shard_rows.items()
    }
    labelled = series[series[C.LABEL] >= 0]
    summary: dict[str, Any] = {
        "input": ROUTE_TABLE,
        "n_files": len(paths),
        "n_image_files": sum(1 for p in paths if not info_of[p][1]),
        "files_quarantined": dict(sorted(Counter(_category(r[3]) for r in file_q).items())),
        "n_units_found": len(cases),
        "units_excluded": dict(sorted(excluded.items())),
        "n_units": len(series),
        "n_patients": int(series[C.PATIENT_PID].nunique()),
        "n_studies": int(series[C.STUDY_PID].nunique()),
        "n_positive": int((labelled[C.LABEL] == 1).sum()),
        "n_negative": int((labelled[C.LABEL] == 0).sum()),
        "units_by_modality": {
            str(k): int(v) for k, v in series[C.MODALITY].value_counts().sort_index().items()
        },
        "channels": [c for c in channels if c],
        "n_shards": n_shards,
        "units_per_shard": [len({r[0] for r in shard_rows[k]}) for k in range(n_shards)],
        "positive_value": positive,
    }
    extra = {}
    kept = {r[C.SERIES_PID] for r in series_rows}
    for name, path in ((LESIONS_TABLE, lesions_table),
                       (EXCLUDED_LESIONS_TABLE, excluded_lesions_table)):  # fmt: skip
        if path:
            extra[name], counts = _join_lesions(path, columns, cases, channels[0], pseudo,
                                                info_of, kept)  # fmt: skip
            summary["lesions" if name == LESIONS_TABLE else "excluded_lesions"] = counts
        else:
            extra[name] = pd.DataFrame(columns=LESION_COLUMNS)
    return IndexResult(
        extra=extra,
        series=series,
        quarantine=q_results[[C.FILE_ID, C.SERIES_PID, C.REASON]].reset_index(drop=True),
        quarantine_paths=q_private[[C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]].reset_index(
            drop=True
        ),
        shard_files=shard_files,
        annotations=pd.DataFrame(columns=[C.SERIES_PID, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]),
        summary=summary,
    )


def _join_lesions(lesions_table, columns: TableColumns, cases: dict, reference_channel: str,
                  pseudo, info_of: dict, kept: set[str]) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """The lesions table joined to the kept cases: (table of LESION_COLUMNS, counts).
    `inside_image` says whether the centre lies within the reference image's extent."""
    header = read_table(lesions_table).columns
    key = columns.case if columns.case in header else columns.patient
    case_of_key: dict[str, str] = {}
    for case in cases.values():
        ident = case.case if key == columns.case else case.rows[0].patient
        case_of_key.setdefault(ident, case.case)
    rows = read_lesion_rows(lesions_table, key, "data.lesions_table")
    out, counts = [], {"n_lesions": len(rows), "unmatched": 0, "case_left_out": 0,
                       "outside_image": 0}  # fmt: skip
    for ident, world, diameter in rows:
        case = case_of_key.get(ident)
        if case is None:
            counts["unmatched"] += 1
            continue
        series_pid = pseudo("ser", case)
        if series_pid not in kept:
            counts["case_left_out"] += 1
            continue
        row = next(r for r in cases[case].rows if r.channel == reference_channel)
        inside = _inside(info_of[row.path][0], world)
        counts["outside_image"] += int(not inside)
        out.append((series_pid, *world, diameter, inside))
    return lesion_frame(out), counts


def world_to_index(info: ImageInfo, world) -> np.ndarray:
    """Continuous voxel index (x, y[, z]) of a world point (LPS mm) in an image with
    `info`'s geometry: index = D^-1 (world - origin) / spacing (ITK's convention)."""
    n = info.ndim if not (info.ndim == 2 and len(info.size) == 3) else 3
    d = np.asarray(info.direction, float).reshape(n, n)
    offset = np.asarray(world[:n], float) - np.asarray(info.origin[:n], float)
    return np.linalg.solve(d, offset) / np.asarray(info.spacing[:n], float)


def _inside(info: ImageInfo, world) -> bool:
    if info.planar:
        return False
    index = world_to_index(info, world)
    size = np.asarray(info.size[: len(index)], float)
    return bool(np.all(index >= -0.5) and np.all(index <= size - 0.5))


def _format_name(path: str) -> str:
    name = path.lower()
    for suffix in VOLUME_SUFFIXES + PLANAR_SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    return ""


def _category(reason: str) -> str:
    """`reason` without case-specific details, for counting."""
    if reason.startswith(("channel ", "mask: ")) and ": " in reason:
        reason = reason.split(": ", 1)[1]
    return next((p for p in _DETAILED if reason.startswith(p)), reason)


def _case_problem(case: _Case, channels: list[str], info_of: dict, need_label: bool) -> str:
    """Why a case cannot be used ("" if it can)."""
    rows = case.rows
    if len({r.patient for r in rows}) > 1:
        return REASON_PATIENT_DIFFERS
    counts = Counter(r.channel for r in rows)
    twice = [c for c, n in counts.items() if n > 1]
    if twice:
        what = f" ({', '.join(twice)})" if twice != [""] else ""
        return f"{REASON_DUPLICATE_CHANNEL}{what}: one file per channel and case"
    missing = [c for c in channels if c not in counts]
    if missing:
        return (f"{REASON_MISSING_CHANNEL} {', '.join(missing)} (the table's channels are "
                f"{', '.join(channels)})")  # fmt: skip
    labels = {r.label for r in rows}
    if len(labels) > 1:
        return REASON_LABEL_DIFFERS
    if need_label and labels == {""}:
        return REASON_NO_LABEL
    masks = {r.mask for r in rows if r.mask}
    if len(masks) > 1:
        return "several mask files for one case: give the same mask on every row, or one"
    for r in rows:
        if info_of[r.path][1]:
            return f"{f'channel {r.channel}: ' if r.channel else ''}{info_of[r.path][1]}"
    for m in masks:
        if info_of[m][1]:
            return f"mask: {info_of[m][1]}"
    by_channel = {r.channel: info_of[r.path][0] for r in rows}
    ref = by_channel[channels[0]]
    for ch in channels[1:]:
        info = by_channel[ch]
        if info.ndim != ref.ndim or (ref.planar or info.planar) and info.size != ref.size:
            return (f"{REASON_CHANNEL_GRID}: {ch} is {info.describe()}, {channels[0]} is "
                    f"{ref.describe()} (planar images have no geometry to resample by)")  # fmt: skip
    for mask in masks:
        info = info_of[mask][0]
        if not info.same_grid(ref):
            return (f"{REASON_MASK_GRID}: the mask is {info.describe()}, the image is "
                    f"{ref.describe()}; resample the mask onto its image")  # fmt: skip
        if info.components != 1:
            return f"{REASON_MASK_GRID}: the mask has {info.components} components per voxel"
    return ""


# ------------------------------------------------------------------- conversion
MANIFEST_COLUMNS = [C.SERIES_PID, C.STATUS, C.REASON, "route", "ndim", "shape", "spacing_mm",
                    "dtype"]  # fmt: skip


def read_shard_table(path: str | os.PathLike) -> pd.DataFrame:
    return read_tsv(path, text=True)


def _planar_pixels(path: str) -> tuple[np.ndarray, dict]:
    """(rows, cols) pixels of a PNG/JPEG/TIFF and notes; colour becomes grey (exactly,
    when the colour channels are equal; else ITU-R BT.601 luma, noted)."""
    from PIL import Image

    notes: dict[str, Any] = {}
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        array = np.asarray(im)
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if array.shape[2] in (2, 4):
            notes["alpha_dropped"] = True
        if colour.shape[2] == 3 and not (
            np.array_equal(colour[..., 0], colour[..., 1])
            and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            luma = colour.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            array = luma.astype(np.float32)
            notes["colour_to_grey"] = "ITU-R BT.601 luma"
        else:
            array = colour[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array), notes


def convert_table_unit(
    series_pid: str,
    modality: str,
    images: list[tuple[str, str]],
    mask: str,
    root: str,
    out_dir: str,
    compression_level: int = 6,
    threads: int = 1,
) -> dict[str, Any]:
    """Convert one case (`images`: (channel, path) with the reference channel first;
    `mask`: a path or ""); never raises for a bad case. Returns its manifest row."""
    from radflow.dicom import radflow_version

    out = Path(out_dir)
    outputs = [out / f"{series_pid}{s}" for s in (C.NIFTI_SUFFIX, C.SIDECAR_SUFFIX)]
    mask_out = out / f"{series_pid}{C.MASK_SUFFIX}"
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update({C.SERIES_PID: series_pid, "route": ROUTE_TABLE})
    absolute = lambda rel: rel if os.path.isabs(rel) else os.path.join(root, rel)  # noqa: E731
    try:
        notes: dict[str, Any] = {}
        resampled: list[str] = []
        if image_kind(images[0][1]) == "planar":
            arrays = []
            for channel, path in images:
                pixels, extra = _planar_pixels(absolute(path))
                if arrays and pixels.shape != arrays[0].shape:
                    raise ValueError(f"channel {channel} is {pixels.shape} pixels, the "
                                     f"reference is {arrays[0].shape}")  # fmt: skip
                arrays.append(pixels)
                notes.update({f"{k}_{channel}" if channel else k: v for k, v in extra.items()})
            data = np.stack(arrays)[:, None]  # (C, 1, rows, cols)
            spacing, affine = (1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0, 1.0])
            ndim, shape = 2, [data.shape[3], data.shape[2], 1]
            mask_array = None
            if mask:
                mask_pixels, _ = _planar_pixels(absolute(mask))
                if mask_pixels.shape != arrays[0].shape:
                    raise ValueError(f"{REASON_MASK_GRID}: {mask_pixels.shape} vs "
                                     f"{arrays[0].shape} pixels")  # fmt: skip
                mask_array = mask_pixels[None]
        else:
            import SimpleITK as sitk

            reference, data, resampled_at = stack_channels([absolute(p) for _, p in images])
            resampled = [images[i][0] for i in resampled_at]
            spacing = tuple(reference.GetSpacing())
            affine = ras_affine(spacing, reference.GetOrigin(), reference.GetDirection())
            size = reference.GetSize()
            ndim = 2 if size[2] == 1 else 3
            shape = list(size)
            mask_array = None
            if mask:
                mask_image = read_volume(absolute(mask))
                if mask_image.GetDimension() == 2:
                    mask_image = sitk.JoinSeries(mask_image)
                if mask_image.GetSize() != reference.GetSize():
                    raise ValueError(f"{REASON_MASK_GRID}: {mask_image.GetSize()} vs "
                                     f"{reference.GetSize()} voxels")  # fmt: skip
                mask_array, _ = mask_onto(mask_image, reference)
        if mask_array is not None:
            mask_array = label_dtype(mask_array)
        channel_names = [c for c, _ in images if c]
        sidecar = {
            "series_pid": series_pid,
            "Modality": modality,
            "route": ROUTE_TABLE,
            "source_format": _format_name(images[0][1]),
            "radflow_version": radflow_version(),
            "ndim": ndim,
            "shape": shape,
            "spacing_mm": [round(float(v), 6) for v in spacing],
            "dtype": str(data.dtype),
            "channels": channel_names,
            "n_channels": len(images),
            "channels_resampled": resampled,
            "has_mask": mask_array is not None,
            **(
                {"geometry": "nominal 1 mm pixels (the format has none)"}
                if ndim == 2 and image_kind(images[0][1]) == "planar"
                else {}
            ),  # fmt: skip
            **notes,
        }
        write_case(out, series_pid, data, affine, mask_array, sidecar,
                   compression_level=compression_level, threads=threads)  # fmt: skip
        row.update({C.STATUS: C.STATUS_OK, "ndim": ndim,
                    "shape": "\\".join(map(str, shape[:ndim] if ndim == 2 else shape)),
                    "spacing_mm": "\\".join(f"{v:.6g}" for v in spacing[:ndim]),
                    "dtype": str(data.dtype)})  # fmt: skip
    except Exception as exc:  # one bad case must not stop the shard
        secrets = [root, *(p for _, p in images), mask]
        secrets += [os.path.basename(s) for s in secrets if s]
        row.update({C.STATUS: C.STATUS_FAILED, C.REASON: _short(exc, secrets)})
        for stale in (*outputs, mask_out):
            stale.unlink(missing_ok=True)
    return row


def _convert_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    return convert_table_unit(**kwargs)


def convert_table_shard(
    shard_table: str | os.PathLike,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threads: int = 1,
    compression_level: int = 6,
    progress: bool = True,
) -> pd.DataFrame:
    """Convert every case of a private images shard table; writes `manifest.tsv` (the
    DICOM convert stage's columns, route "images_table") and returns it."""
    from radflow.dicom.convert import plan_workers, run_jobs

    table = read_shard_table(shard_table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for series_pid, group in table.groupby(C.SERIES_PID, sort=True):
        images = group[group[ROLE] == ROLE_IMAGE]
        masks = group.loc[group[ROLE] == ROLE_MASK, C.PATH]
        jobs.append(dict(series_pid=series_pid, modality=images[C.MODALITY].iloc[0],
                         images=list(zip(images[CHANNEL], images[C.PATH], strict=True)),
                         mask=masks.iloc[0] if len(masks) else "", root=str(root),
                         out_dir=str(out), compression_level=compression_level))  # fmt: skip
    processes, unit_threads = plan_workers(len(jobs), threads)
    for job in jobs:
        job["threads"] = unit_threads
    rows = run_jobs(_convert_job, jobs, processes, MANIFEST_COLUMNS, unit="case",
                    progress=progress, failed={"route": ROUTE_TABLE})  # fmt: skip
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    write_tsv(manifest, out / C.MANIFEST)
    return manifest
