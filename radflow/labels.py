"""The user's label and annotation tables (CSV/TSV), checked row by row.

Error messages name the file, column and line, never a value (values are identifiers).
Used by the index of a DICOM tree; the same tables serve other inputs.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from radflow import conventions as C
from radflow.tables import read_table


def _require_columns(
    table: pd.DataFrame,
    path: str | os.PathLike,
    columns: Iterable[str],
    settings: str = "the label_key / label_column settings",
) -> None:
    for column in columns:
        if column not in table.columns:
            present = ", ".join(repr(c) for c in table.columns)
            raise ValueError(
                f"{path}: no column {column!r} (columns present: {present}); check {settings}"
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


def read_masks(masks_table: str | os.PathLike, *, key: str, column: str = "mask") -> dict[str, str]:
    """{key value: absolute mask path} from a masks table: CSV/TSV, one row per mask,
    with the key column `key` (a DICOM keyword, the column named like it) and the path
    column `column` (relative to the table's folder, or absolute).

    Raises ValueError, naming file, column and line but never a value, on a missing
    column, no rows, an empty key or path, or one key given two different paths.
    """
    table = read_table(masks_table)
    _require_columns(table, masks_table, [key, column],
                     "the data.masks_key (default data.case_key) / data.masks_column settings")  # fmt: skip
    if table.empty:
        raise ValueError(f"{masks_table}: the masks table has no rows")
    root = os.path.dirname(os.path.abspath(masks_table))
    masks: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for i, (key_value, path) in enumerate(zip(table[key], table[column], strict=True)):
        for name, text in ((key, key_value), (column, path)):
            if not text:
                raise ValueError(f"{masks_table}: empty {name!r} at line {_line(i)}")
        path = os.path.normpath(os.path.join(root, path))
        if key_value in masks and masks[key_value] != path:
            raise ValueError(f"{masks_table}: lines {first_line[key_value]} and {_line(i)} give "
                             f"different {column!r} files for the same {key!r}")  # fmt: skip
        masks[key_value] = path
        first_line.setdefault(key_value, _line(i))
    return masks


def mask_files(masks_table: str | os.PathLike, column: str = "mask") -> list[str]:
    """Every path the masks table names, as written (for the workflow's fingerprint of
    the input data; a table without the column names none)."""
    table = read_table(masks_table)
    return sorted({p for p in table.get(column, []) if p})


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


def join_annotations(
    annotations: Sequence[Annotation],
    units_of_key: dict[str, list[dict[str, Any]]],
    all_keys: set[str],
) -> tuple[list[tuple[str, float, float, float]], dict[str, int]]:
    """Annotation rows (series_pid, row_px, col_px, diameter_mm) for the 2D units that
    share each annotation's key, and counts of those that matched nothing, matched no
    kept 2D unit or lie outside the image."""
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
