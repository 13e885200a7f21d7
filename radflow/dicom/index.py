"""Index a raw DICOM export: classify every file, group images into units, join labels.

`build_index` reads headers only (never pixel data; `radflow.dicom.headers`), in
parallel, groups the image files into units (`radflow.dicom.units`: one NIfTI image
each, 3D or, for a time series or diffusion series, 4D as dcm2niix writes it), joins the
labels and returns an `IndexResult`: PHI-free tables for results/ (series, quarantine,
annotations, summary) and private tables that hold file paths (quarantine paths, the
file list of each shard).

Privacy rules enforced here: results tables and log text carry only pseudonyms
(`conventions.pseudonym`), counts and whitelisted acquisition values; file paths (folder
names of real exports are often patient names) and identifier values (patient ids,
accession numbers, UIDs) appear only in the private tables or nowhere. Error messages
about the labels table name the file, column and line, never a value.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydicom.datadict import tag_for_keyword

from radflow import conventions as C
from radflow.dicom.cases import CASE_SHARD_COLUMNS, index_cases
from radflow.dicom.channels import CaseSettings
from radflow.dicom.headers import (  # noqa: F401  (re-exported: the index's public names)
    REASON_DICOMDIR,
    REASON_DUPLICATE,
    REASON_EMPTY,
    REASON_NO_LABEL,
    REASON_NOT_DICOM,
    REASON_TRUNCATED_HEADER,
    FileRecord,
    read_file_record,
    scan_files,
)
from radflow.dicom.units import REASON_LOCALIZER, REASON_OFF_STACK, group_units, identity_problem
from radflow.files import list_files, tree_fingerprint  # noqa: F401
from radflow.labels import (  # noqa: F401
    Annotation,
    join_annotations,
    read_annotations,
    read_labels,
    read_masks,
)
from radflow.lesions import (
    EXCLUDED_LESIONS_TABLE,
    LESIONS_TABLE,
    join_dicom_lesion_tables,
    lesions_summary_text,
)
from radflow.tables import read_table, read_tsv, write_bytes_atomic, write_tsv  # noqa: F401

#: Reasons that end in file-specific details "(...)"; the summary counts them by prefix.
_DETAILED_REASONS = (
    "truncated file: pixel data incomplete",
    "pixel data too short for Rows x Columns",
    "multi-frame instance",
    "unreadable DICOM",
    REASON_LOCALIZER,
    REASON_OFF_STACK,
)

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
_SHARD_COLUMNS = [C.SERIES_PID, C.MODALITY, C.PATH, C.FRAMES, C.UNIT_KEYS]
_ANNOTATION_COLUMNS = [C.SERIES_PID, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]


# ------------------------------------------------------------------- tables in
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
    #: further PHI-free results tables by file name (images tables: lesions.tsv)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)

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
            *(write_tsv(table, results / name) for name, table in sorted(self.extra.items())),
        ]
        for shard in sorted(self.shard_files):
            path = private / C.SHARD_INDEX_DIR / f"{C.shard_name(shard)}.tsv"
            written.append(write_tsv(self.shard_files[shard], path))
        return written

    def summary_text(self) -> str:
        """A few PHI-free log lines: counts only."""
        s = self.summary
        lines = [
            f"index: {s['n_files']} files, {s['n_image_files']} image files, "
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
        if "n_label_keys" in s:  # DICOM input: labels come from a separate table
            lines.append(
                f"index: {s['n_label_keys_unmatched']} of {s['n_label_keys']} label keys "
                "match no image unit"
            )
        if s.get("channels"):
            lines.append(f"index: channels {', '.join(s['channels'])} (the first is the "
                         "reference grid)")  # fmt: skip
        cases = s.get("cases") or {}
        if cases.get("case_key"):
            lines.append(f"index: {cases['n_cases_found']} cases by {cases['case_key']}, "
                         f"{cases['n_units_not_a_channel']} image units match no channel")  # fmt: skip
        if cases.get("masks"):
            m = cases["masks"]
            lines.append(f"index: {m['n_rows']} masks table rows ({m['unmatched']} match no "
                         f"image unit), {m['kept_cases_with_mask']} kept cases with a mask")  # fmt: skip
        if s.get("n_label_keys_with_several_patients"):
            lines.append(
                f"index: WARNING {s['n_label_keys_with_several_patients']} label keys occur "
                f"with more than one {s['patient_key']}: check for merged patient records"
            )
        lesion_counts = {
            name: s[key]
            for name, key in (
                (LESIONS_TABLE, "lesions"),
                (EXCLUDED_LESIONS_TABLE, "excluded_lesions"),
            )
            if s.get(key)
        }
        lines += lesions_summary_text(lesion_counts)
        if s.get("annotations"):
            a = s["annotations"]
            lines.append(
                f"index: {a['rows_written']} annotation rows from {a['n_annotations']} "
                f"annotations ({a['unmatched']} match no image unit, {a['no_kept_2d_unit']} "
                f"match no kept 2D unit, {a['outside_image']} outside the image)"
            )
        return "\n".join(lines)


def read_shard_files(path: str | os.PathLike) -> pd.DataFrame:
    """Read a private shard table written by `IndexResult.write` (all strings).

    Columns: series_pid, modality, path, frames (`conventions.FRAMES`: the 0-based frames
    of a multi-frame file that belong to the unit, "" for all). Tables written before the
    frames column existed read with frames "" everywhere.
    """
    table = read_tsv(path, text=True)
    for column in (C.FRAMES, C.UNIT_KEYS):
        if column not in table.columns:
            table[column] = ""
    return table


# ------------------------------------------------------------------ the index
def _check_keyword(keyword: str, what: str) -> None:
    if tag_for_keyword(keyword) is None:
        raise ValueError(f"{what} {keyword!r} is not a DICOM keyword (e.g. 'AccessionNumber')")


@dataclass
class _Rows:
    """What the index collects unit by unit (or case by case, `radflow.dicom.cases`)."""

    pseudo: C.Pseudonyms
    file_id: dict[str, str]
    n_shards: int
    series: list[dict[str, Any]] = field(default_factory=list)
    shards: dict[int, list[tuple[str, ...]]] = field(default_factory=dict)
    #: (file_id, series_pid, path, reason): excluded units in results (file_id, path
    #: empty), and each of their files in the private table
    unit_quarantine: list[tuple[str, str, str, str]] = field(default_factory=list)
    unit_file_quarantine: list[tuple[str, str, str, str]] = field(default_factory=list)
    excluded: Counter[str] = field(default_factory=Counter)
    unit_of_sop: dict[str, str] = field(default_factory=dict)
    label_keys_used: set[str] = field(default_factory=set)
    #: one labelled key seen with several patients (merged records?) can leak across splits
    patients_of_key: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    units_of_key: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self) -> None:
        self.shards = {k: [] for k in range(self.n_shards)}

    def exclude(self, series_pid: str, files: Sequence[FileRecord], reason: str,
                category: str | None = None) -> None:  # fmt: skip
        self.excluded[category or reason] += 1
        self.unit_quarantine.append(("", series_pid, "", reason))
        self.unit_file_quarantine.extend(
            (self.file_id[f.path], series_pid, f.path, reason) for f in files
        )

    def series_row(self, series_pid: str, first: FileRecord, label: int, shard: int,
                   n_files: int) -> dict[str, Any]:  # fmt: skip
        return {
            C.SERIES_PID: series_pid,
            C.STUDY_PID: self.pseudo("stu", first.study_uid),
            C.PATIENT_PID: self.pseudo("pat", first.patient),
            C.LABEL: label,
            C.SHARD: shard,
            C.MODALITY: first.modality,
            "n_files": n_files,
            "rows": first.rows,
            "columns": first.columns,
            "photometric": first.photometric,
            "pixel_spacing_mm": first.pixel_spacing,
            "body_part": first.body_part,
            "view_position": first.view_position,
            "manufacturer": first.manufacturer,
        }


def _index_units(units, rows: _Rows, labels: dict[str, int], label_key: str,
                 patient_key: str) -> None:  # fmt: skip
    """Every unit its own labelled image (the default, without data.case_key)."""
    for unit in units:
        files = sorted(unit.files, key=lambda f: f.path)
        series_pid = rows.pseudo("ser", unit.unit_id)
        for f in files:
            rows.unit_of_sop.setdefault(f.sop_uid, series_pid)
        reason = unit.problem or identity_problem(files, patient_key, label_key)
        label_value = files[0].label_value
        if not reason and label_value not in labels:
            reason = REASON_NO_LABEL
        if reason:
            rows.exclude(series_pid, files, reason)
            continue
        rows.label_keys_used.add(label_value)
        first = files[0]
        shard = C.shard_of(series_pid, rows.n_shards)
        row = rows.series_row(series_pid, first, labels[label_value], shard, len(files))
        rows.series.append(row)
        rows.shards[shard].extend(
            (series_pid, first.modality, f.path, unit.frames.get(f.path, ""), unit.keys)
            for f in files
        )
        if first.modality in C.PROJECTION_MODALITIES:
            rows.units_of_key[label_value].append(row)
        rows.patients_of_key[label_value].add(row[C.PATIENT_PID])


SERIES_UID_KEYWORD = "SeriesInstanceUID"


def series_have_lesions(records, lesions_table) -> dict[str, int]:
    """Labels of a localisation study without a labels table: every indexed series
    (its SeriesInstanceUID, the label key), 1 where the lesions table lists a lesion."""
    from radflow.lesions import SERIES_KEY, read_lesion_rows

    with_lesion = {uid for uid, _, _ in read_lesion_rows(lesions_table, SERIES_KEY,
                                                          "data.lesions_table")}  # fmt: skip
    return {rec.label_value: int(rec.label_value in with_lesion)
            for rec in records if not rec.reason and rec.label_value}  # fmt: skip


def build_index(
    dicom_root: str | os.PathLike,
    labels_table: str | os.PathLike | None,
    *,
    label_key: str = "AccessionNumber",
    label_column: str = "label",
    positive_value: str = "1",
    patient_key: str = "PatientID",
    annotations_table: str | os.PathLike | None = None,
    case_key: str | None = None,
    channels: dict[str, str] | None = None,
    channel_keyword: str = "SeriesDescription",
    reference_channel: str | None = None,
    masks_table: str | os.PathLike | None = None,
    masks_key: str | None = None,
    masks_column: str = "mask",
    mask_labels: dict[str, int] | None = None,
    lesions_table: str | os.PathLike | None = None,
    excluded_lesions_table: str | os.PathLike | None = None,
    key: bytes,
    n_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> IndexResult:
    """Index the DICOM files under `dicom_root` and join the labels.

    Inputs:
      dicom_root: folder tree of DICOM files (any names, any nesting; hidden files skipped).
      labels_table: CSV/TSV with columns `label_key` (a DICOM keyword whose header value
        identifies the labelled entity, e.g. AccessionNumber) and `label_column`. May be
        None with a masks table (a segmentation study): every case's label is then -1;
        or with a lesions table (localisation, label_key SeriesInstanceUID): a series's
        label is then whether it holds a lesion (it stratifies the split).
      positive_value: label text that means 1; any other non-empty text means 0.
      patient_key: DICOM keyword identifying the patient (for patient-level splits).
      annotations_table: optional CSV/TSV keyed by `label_key` with row_px, col_px
        (0-based pixels of the stored image) and diameter_mm. An annotation whose key
        matches several 2D units (e.g. all views of one study) is attached to each of them;
        annotations matching only 3D units, or outside the image, are counted, not kept.
      case_key, channels, channel_keyword, reference_channel: multi-series cases
        (`radflow.dicom.cases`): units grouped by the value of `case_key`, each named by
        the channel whose pattern its `channel_keyword` value matches. None: one unit,
        one image (as before).
      masks_table: optional CSV/TSV of ground-truth masks keyed by `masks_key` (default
        `case_key`, else `label_key`) with the path column `masks_column`; every case
        then needs one mask. Its files are not indexed as images. `mask_labels`
        ({SegmentLabel: value}) labels a DICOM SEG's segments (default: their numbers).
      lesions_table, excluded_lesions_table: optional CSV/TSV of lesion centres and of
        excluded findings in world mm, LUNA16's form (`seriesuid` = SeriesInstanceUID,
        coordX, coordY, coordZ, diameter_mm; radflow.lesions), joined to the kept units
        into `IndexResult.extra` (lesions.tsv, lesions_excluded.tsv).
      key: pseudonymisation key (conventions.load_or_create_key).
      n_shards: number of shards; each unit (case) goes to shard_of(series_pid, n_shards).
      threads: worker processes for header reading.
    Output: an `IndexResult` (call `.write(results_dir, private_dir)`).
    Raises ValueError on a malformed labels/annotations/masks table or settings,
    RuntimeError on a pseudonym collision.
    """
    _check_keyword(label_key, "label_key")
    _check_keyword(patient_key, "patient_key")
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if labels_table is None and masks_table is None and lesions_table is None:
        raise ValueError("a DICOM tree needs a labels table, a masks table (segmentation) or "
                         "a lesions table (localisation)")  # fmt: skip
    if labels_table is None and masks_table is None and label_key != SERIES_UID_KEYWORD:
        raise ValueError(f"without a labels table the lesions table's seriesuid is the key: "
                         f"set data.label_key to {SERIES_UID_KEYWORD} (got {label_key})")  # fmt: skip
    settings = None
    if case_key or channels or masks_table:
        settings = CaseSettings.build(case_key, channels, channel_keyword, reference_channel)
        for keyword, what in zip(settings.keywords, ("case_key", "channel_keyword"), strict=False):
            _check_keyword(keyword, f"data.{what}")
    masks_key = masks_key or case_key or label_key
    masks = None
    if masks_table:
        _check_keyword(masks_key, "data.masks_key")
        masks = read_masks(masks_table, key=masks_key, column=masks_column)
    labels = (
        read_labels(labels_table, label_key=label_key, label_column=label_column,
                    positive_value=positive_value)
        if labels_table else None
    )  # fmt: skip
    annotations = (
        read_annotations(annotations_table, label_key=label_key) if annotations_table else []
    )
    rels = list_files(dicom_root)
    if masks:  # mask files inside the tree are masks, not images to index
        root = os.path.abspath(dicom_root)
        mask_files = {os.path.relpath(p, root) for p in masks.values()}
        rels = [rel for rel in rels if os.path.normpath(rel) not in mask_files]
    extra_keys = (*settings.keywords, masks_key) if settings is not None else ()
    records = scan_files(
        dicom_root,
        rels,
        patient_key=patient_key,
        label_key=label_key,
        extra_keys=tuple(dict.fromkeys(extra_keys)),
        threads=threads,
        progress=progress,
    )
    if labels is None and masks is None:
        labels = series_have_lesions(records, lesions_table)
    pseudo = C.Pseudonyms(key)
    file_id = {rec.path: pseudo("file", rec.path) for rec in records}

    # Rows (file_id, series_pid, path, reason). Files of excluded units go only to the
    # private table; results list such a unit once, with an empty file_id.
    quarantine: list[tuple[str, str, str, str]] = []
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

    # Image units: projection series split into instances; cross-sectional series lose
    # their localizers and split where dcm2niix would (radflow.dicom.units).
    units, left_out = group_units(by_series)
    for rec, reason in left_out:
        quarantine.append((file_id[rec.path], pseudo("ser", rec.series_uid), rec.path, reason))
    split_counts = Counter(u.split_by for u in units if u.split_by)

    rows = _Rows(pseudo, file_id, n_shards)
    case_summary: dict[str, Any] = {}
    if settings is None:
        _index_units(units, rows, labels, label_key, patient_key)
    else:
        case_summary = index_cases(units, settings, rows, labels=labels, patient_key=patient_key,
                                   masks=masks, masks_key=masks_key,
                                   mask_labels=mask_labels)  # fmt: skip

    for rec in duplicates:
        quarantine.append(
            (file_id[rec.path], rows.unit_of_sop.get(rec.sop_uid, ""), rec.path, REASON_DUPLICATE)
        )

    # Keys of units that were found at all, for the "label matches no unit" count.
    found_keys = {unit.files[0].label_value for unit in units}
    annotation_rows, annotation_counts = join_annotations(
        annotations, rows.units_of_key, {f.label_value for unit in units for f in unit.files}
    )

    series_columns = _SERIES_COLUMNS + (["channels"] if settings is not None else [])
    series = pd.DataFrame(rows.series, columns=series_columns)
    series = series.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    columns = [C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]
    order = [C.SERIES_PID, C.FILE_ID, C.REASON]
    q_private = pd.DataFrame(quarantine + rows.unit_file_quarantine, columns=columns)
    quarantine_paths = q_private.sort_values(order, kind="stable")[_QUARANTINE_PATH_COLUMNS]
    quarantine_paths = quarantine_paths.reset_index(drop=True)
    q_results = pd.DataFrame(quarantine + rows.unit_quarantine, columns=columns)
    quarantine_table = q_results.sort_values(order, kind="stable")[_QUARANTINE_COLUMNS]
    quarantine_table = quarantine_table.reset_index(drop=True)
    if settings is None:
        shard_files = {k: pd.DataFrame(sorted(v), columns=_SHARD_COLUMNS)
                       for k, v in rows.shards.items()}  # fmt: skip
    else:  # by case; within a case in channel order, the reference first, then the mask
        shard_files = {
            k: pd.DataFrame(sorted(v, key=lambda r: r[0]),
                            columns=_SHARD_COLUMNS + CASE_SHARD_COLUMNS)
            for k, v in rows.shards.items()
        }  # fmt: skip
    annotation_table = pd.DataFrame(annotation_rows, columns=_ANNOTATION_COLUMNS)
    annotation_table = annotation_table.sort_values(_ANNOTATION_COLUMNS, kind="stable")
    annotation_table = annotation_table.reset_index(drop=True)

    file_reasons = Counter(reason_category(row[3]) for row in quarantine if row[0])
    summary: dict[str, Any] = {
        "n_files": len(records),
        "n_image_files": sum(1 for rec in records if not rec.reason),
        "files_quarantined": dict(sorted(file_reasons.items())),
        "n_units_found": len(units),
        "units_excluded": dict(sorted(rows.excluded.items())),
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
    }
    if labels is not None:
        summary.update({
            "n_label_keys": len(labels),
            "n_label_keys_unmatched": len(set(labels) - found_keys),
            "n_label_keys_used": len(rows.label_keys_used),
        })  # fmt: skip
    summary.update({
        "n_label_keys_with_several_patients": sum(
            len(p) > 1 for p in rows.patients_of_key.values()
        ),
        "n_shards": n_shards,
        "units_per_shard": [len({r[0] for r in rows.shards[k]}) for k in range(n_shards)],
        "label_key": label_key,
        "patient_key": patient_key,
        "positive_value": str(positive_value).strip(),
    })  # fmt: skip
    if settings is not None:
        summary["cases"] = case_summary
        if settings.case_key:
            summary["channels"] = settings.names
    if annotations_table:
        summary["annotations"] = annotation_counts
    lesion_tables, lesion_counts = join_dicom_lesion_tables(
        {LESIONS_TABLE: lesions_table, EXCLUDED_LESIONS_TABLE: excluded_lesions_table},
        units, rows.unit_of_sop, set(series[C.SERIES_PID]),
    )  # fmt: skip
    if lesions_table:
        summary["lesions"] = lesion_counts[LESIONS_TABLE]
    if excluded_lesions_table:
        summary["excluded_lesions"] = lesion_counts[EXCLUDED_LESIONS_TABLE]
    return IndexResult(
        extra=lesion_tables,
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
