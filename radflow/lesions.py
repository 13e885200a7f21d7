"""Lesion centres in world millimetres (LUNA16's form), joined to the indexed images.

A lesions table has one row per lesion: a key naming its image, and ``coordX, coordY,
coordZ`` (the centre in DICOM/ITK patient coordinates, LPS+: x towards the patient's
left, y posterior, z head, millimetres: the frame of ImagePositionPatient and of
LUNA16's annotations.csv) and ``diameter_mm``. An excluded-findings table has the same
form (LUNA16's annotations_excluded.csv: findings a candidate may hit without being
counted as a false positive; diameter -1 where unmeasured).

The index joins both to the kept images and writes them by series pseudonym
(results/index/lesions.tsv and lesions_excluded.tsv, `LESION_COLUMNS`), marking centres
outside their image. For DICOM input the key is the series (column ``seriesuid``, the
SeriesInstanceUID, as LUNA16 names it); for an images table, the case (or patient)
column (radflow.images).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from radflow import conventions as C
from radflow.labels import _line, _require_columns
from radflow.tables import read_table

#: results/index/: included lesions and excluded findings, by series pseudonym.
LESIONS_TABLE = "lesions.tsv"
EXCLUDED_LESIONS_TABLE = "lesions_excluded.tsv"
LESION_COLUMNS = [C.SERIES_PID, "coord_x_mm", "coord_y_mm", "coord_z_mm", C.DIAMETER_MM,
                  "inside_image"]  # fmt: skip
WORLD_COLUMNS = ("coordX", "coordY", "coordZ")
LESION_INPUT = (*WORLD_COLUMNS, "diameter_mm")
#: The DICOM-input key column: the SeriesInstanceUID, LUNA16's `seriesuid`.
SERIES_KEY = "seriesuid"


def read_lesion_rows(
    path: str | os.PathLike, key: str, what: str
) -> list[tuple[str, np.ndarray, float]]:
    """(key value, centre (3,) LPS mm, diameter mm) per row of the lesions table `path`;
    `what` names the config key in errors. Raises ValueError naming the file, line and
    column of a missing column or a value that is not a number."""
    table = read_table(path)
    _require_columns(table, path, [key, *LESION_INPUT],
                     f"{what}: the key column {key!r} and coordX, coordY, coordZ, diameter_mm")  # fmt: skip
    rows = []
    for i, record in enumerate(table.to_dict("records")):
        values = []
        for column in LESION_INPUT:
            try:
                values.append(float(record[column]))
            except ValueError:
                raise ValueError(
                    f"{path}: line {_line(i)}: column {column} holds {record[column]!r}, not "
                    "a number (world millimetres; diameter_mm -1 where unmeasured)"
                ) from None
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{path}: line {_line(i)}: coordinates and diameter must be finite")
        rows.append((str(record[key]), np.array(values[:3]), values[3]))
    return rows


def lesion_frame(rows: Iterable[tuple]) -> pd.DataFrame:
    """A LESION_COLUMNS table from (series_pid, x, y, z, diameter, inside) tuples, sorted."""
    frame = pd.DataFrame(list(rows), columns=LESION_COLUMNS)
    return frame.sort_values(LESION_COLUMNS[:4], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------ DICOM input
def slice_stack_index(world, files) -> np.ndarray | None:
    """Continuous voxel index (column, row, slice) of a world point (LPS mm) in the
    slice stack of a unit's `files` (radflow.dicom.headers.FileRecord, single-frame or
    multi-frame with per-frame positions); None where the headers lack the geometry."""
    slices = [s for f in files for s in f.slices if s.position and s.orientation]
    if not slices or not files[0].pixel_spacing:
        return None
    try:
        row_mm, col_mm = (float(v) for v in files[0].pixel_spacing.split("\\")[:2])
    except ValueError:
        return None
    cosines = np.asarray(slices[0].orientation, float)
    along_row, along_col = cosines[:3], cosines[3:6]  # column index, row index directions
    normal = np.cross(along_row, along_col)
    positions = np.array([s.position for s in slices], float)
    depth = np.sort(positions @ normal)
    first = positions[np.argmin(positions @ normal)]
    offset = np.asarray(world, float) - first
    spacing = float(np.median(np.diff(depth))) if len(depth) > 1 else 1.0
    return np.array([
        offset @ along_row / col_mm,
        offset @ along_col / row_mm,
        (offset @ normal) / (spacing or 1.0),
    ])  # fmt: skip


def _inside_stack(world, files) -> bool:
    index = slice_stack_index(world, files)
    if index is None:
        return False
    n_slices = sum(max(1, len(f.slices)) for f in files)
    size = np.array([files[0].columns, files[0].rows, n_slices], float)
    return bool(np.all(index >= -0.5) and np.all(index <= size - 0.5))


def join_series_lesions(
    path: str | os.PathLike,
    units: Sequence,
    series_pid_of_sop: Mapping[str, str],
    kept: set[str],
    *,
    what: str = "data.lesions_table",
) -> tuple[pd.DataFrame, dict]:
    """The lesions table `path` (keyed by `SERIES_KEY`) joined to the kept DICOM units:
    (LESION_COLUMNS table, counts). A series split into several units (echoes, stacks)
    gives its lesion to the unit whose slice stack holds the centre (else its first).
    `series_pid_of_sop`: the index's SOPInstanceUID -> series pseudonym; `kept`: the
    pseudonyms of the units the index kept."""
    units_of_series: dict[str, list] = {}
    for unit in units:
        if unit.files:
            units_of_series.setdefault(unit.files[0].series_uid, []).append(unit)
    out, counts = [], {"n_lesions": 0, "unmatched": 0, "case_left_out": 0, "outside_image": 0}
    for series_uid, world, diameter in read_lesion_rows(path, SERIES_KEY, what):
        counts["n_lesions"] += 1
        candidates = units_of_series.get(series_uid)
        if not candidates:
            counts["unmatched"] += 1
            continue
        inside = [_inside_stack(world, u.files) for u in candidates]
        unit = candidates[int(np.argmax(inside))]
        pid = series_pid_of_sop.get(unit.files[0].sop_uid)
        if pid is None or pid not in kept:
            counts["case_left_out"] += 1
            continue
        counts["outside_image"] += int(not any(inside))
        out.append((pid, *world, diameter, any(inside)))
    return lesion_frame(out), counts


def join_dicom_lesion_tables(
    tables: Mapping[str, str | os.PathLike | None],
    units: Sequence,
    series_pid_of_sop: Mapping[str, str],
    kept: set[str],
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Both lesion tables of a DICOM study ({LESIONS_TABLE: path or None,
    EXCLUDED_LESIONS_TABLE: path or None}) joined: (result tables by name, counts by
    name). A table not given is written empty."""
    frames, counts = {}, {}
    for name, path in tables.items():
        if not path:
            frames[name] = pd.DataFrame(columns=LESION_COLUMNS)
            continue
        what = "data.lesions_table" if name == LESIONS_TABLE else "data.excluded_lesions_table"
        frames[name], counts[name] = join_series_lesions(path, units, series_pid_of_sop, kept,
                                                         what=what)  # fmt: skip
    return frames, counts


def lesions_summary_text(
    counts: Mapping[str, Mapping[str, int]], noun: str = "lesion"
) -> list[str]:
    """Log lines of the join counts."""
    lines = []
    for name, c in counts.items():
        kind = "excluded findings" if name == EXCLUDED_LESIONS_TABLE else f"{noun}s"
        lines.append(
            f"index: {c['n_lesions']} {kind}: {c['unmatched']} match no image, "
            f"{c['case_left_out']} on images left out, {c['outside_image']} outside their image"
        )
    return lines


# ------------------------------------------------------------------ preprocessed space
#: results/preprocessed/<shard>/lesions.tsv: each lesion of the shard's cases in the
#: preprocessed array's voxel indices (z, y, x, fractional), with its world centre.
PREPROCESSED_LESIONS = "lesions.tsv"
VOXEL_COLUMNS = ["z", "y", "x"]
PREPROCESSED_COLUMNS = [C.SERIES_PID, *VOXEL_COLUMNS, C.DIAMETER_MM, "excluded",
                        "coord_x_mm", "coord_y_mm", "coord_z_mm"]  # fmt: skip


def read_index_lesions(
    lesions: str | os.PathLike, excluded: str | os.PathLike | None
) -> pd.DataFrame:
    """The index's lesions.tsv and lesions_excluded.tsv in one table, with a boolean
    column `excluded`."""
    from radflow.tables import read_tsv

    frames = []
    for path, flag in ((lesions, False), (excluded, True)):
        if path:
            frame = read_tsv(path)
            frames.append(frame.assign(excluded=flag))
    if not frames:
        return pd.DataFrame(columns=[*LESION_COLUMNS, "excluded"])
    table = pd.concat(frames, ignore_index=True)
    return table.astype(
        {c: float for c in ("coord_x_mm", "coord_y_mm", "coord_z_mm", C.DIAMETER_MM)}
    )


def lesions_in_preprocessed(manifest: pd.DataFrame, lesions: pd.DataFrame) -> pd.DataFrame:
    """Every lesion of the manifest's cases carried through each case's geometry
    (radflow.geometry.world_to_preprocessed) into its preprocessed voxel indices:
    PREPROCESSED_COLUMNS, one row per lesion (centres outside the array included: a
    detector's training must know a nodule cut by the crop is there)."""
    from radflow.geometry import world_to_preprocessed

    out = []
    by_case = {pid: group for pid, group in lesions.groupby(C.SERIES_PID)} if len(lesions) else {}
    for row in manifest.to_dict("records"):
        group = by_case.get(row[C.SERIES_PID])
        if group is None:
            continue
        world = group[["coord_x_mm", "coord_y_mm", "coord_z_mm"]].to_numpy(float)
        voxels = world_to_preprocessed(world, row, frame="LPS")
        for (z, y, x), w, d, ex in zip(voxels, world, group[C.DIAMETER_MM], group["excluded"],
                                       strict=True):  # fmt: skip
            out.append((row[C.SERIES_PID], z, y, x, float(d), bool(ex), *w))
    return pd.DataFrame(out, columns=PREPROCESSED_COLUMNS)
