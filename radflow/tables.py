"""Tables and files between stages: one reader for user tables (`read_table`), one for
radflow's own tables (`read_tsv`), one atomic writer (`atomic_path`, `write_bytes_atomic`).

Every file a stage writes goes through a temporary name in the same folder and
`os.replace`, so a killed job never leaves a partial file; an unchanged file keeps its
bytes and modification time (Snakemake's checksum then sees no change).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


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


#: Columns of radflow's own tables that are text whatever they hold: identifiers,
#: reasons, paths, names (an id "007" must not become the number 7).
TEXT_COLUMNS = (
    "series_pid", "study_pid", "patient_pid", "file_id", "path", "reason", "modality",
    "frames", "unit_keys", "split", "status", "route", "shape", "spacing_mm", "dtype",
    "in_shape", "in_spacing_mm", "scale", "offset", "out_spacing_mm", "channel", "role",
    "channels", "source_format", "photometric", "pixel_spacing_mm", "body_part",
    "view_position", "manufacturer", "outcome",
    # the volumes layout's manifest (radflow.volumes): values joined by backslashes
    "intensity", "native_shape", "native_affine", "native_axcodes", "canonical_shape",
    "canonical_spacing_mm", "crop_start", "crop_stop", "resampled_shape", "target_spacing_mm",
    "resampled_spacing_mm", "preprocessed_affine", "label_voxels", "foreground_mean",
    "foreground_std",
)  # fmt: skip


def read_tsv(path: str | os.PathLike, *, text: bool = False) -> pd.DataFrame:
    """One of radflow's own tab-separated tables (what a stage wrote for the next), with
    one set of rules for every stage: UTF-8 (undecodable file-name bytes kept), the
    `TEXT_COLUMNS` as text with "" for empty cells, every other column parsed as numbers
    where it holds numbers, empty cells NaN; "NA", "null", "None" are never missing
    values. `text=True` reads every column as text (private tables of file paths)."""
    options = dict(sep="\t", keep_default_na=False, encoding="utf-8",
                   encoding_errors="surrogateescape")  # fmt: skip
    if text:
        return pd.read_csv(path, dtype=str, na_filter=False, **options)
    table = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str), na_values=[""], **options)
    for column in table.columns.intersection(TEXT_COLUMNS):
        table[column] = table[column].fillna("").astype(str)
    return table


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_identical: bool = False) -> Iterator[Path]:
    """A temporary name beside `path` to write to; when the block ends normally the file
    is flushed to disk and renamed to `path`, when it raises the file is removed. The name
    is unique per process and call, so parallel writers never share one. With
    `keep_identical`, an existing `path` with the same bytes is left untouched (same
    modification time: Snakemake sees no change)."""
    import filecmp

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if not (keep_identical and path.is_file() and filecmp.cmp(tmp, path, shallow=False)):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
