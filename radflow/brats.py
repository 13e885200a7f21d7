"""An images table for BraTS-style case folders, as radflow's images-table input reads it.

    python -m radflow.brats ../shared/data/brats2015 data/brats/images.tsv

Each case folder holds one NIfTI per channel and a label map; the table gets one row
per (case, channel) with the patient (the folder name), the channel, the image's path
and the mask's path, both relative to the table's folder (radflow resolves them from
there), and no label column: the study's target is the mask. The file name patterns are
options, so the same command serves other lesion datasets laid out one folder per case
(MS, stroke): nothing here knows BraTS beyond the default patterns.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from radflow.tables import write_tsv

#: BraTS 2013-2015 as shared in ../shared/data/brats2015 (README there).
DEFAULT_CHANNELS = {"flair": r"^Flair.*\.nii(\.gz)?$", "t1c": r"^T1c.*\.nii(\.gz)?$"}
DEFAULT_MASK = r"^OTMultiClass.*\.nii(\.gz)?$"


def case_table(root: str | os.PathLike, table_dir: str | os.PathLike, *,
               channels: Mapping[str, str] = DEFAULT_CHANNELS,
               mask: str = DEFAULT_MASK) -> pd.DataFrame:  # fmt: skip
    """One row per case folder under `root` and channel: patient_id, channel, path,
    mask (paths relative to `table_dir`). A folder lacking a channel or its mask, or
    matching one twice, is an error naming the folder and the pattern."""
    root, table_dir = Path(root), Path(table_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{root}: no case folders (one folder per case expected)")
    rows = []
    for folder in folders:
        mask_path = _one_file(folder, mask, "mask", table_dir)
        for channel, pattern in channels.items():
            path = _one_file(folder, pattern, f"channel {channel!r}", table_dir)
            rows.append({"patient_id": folder.name, "channel": channel, "path": path,
                         "mask": mask_path})  # fmt: skip
    return pd.DataFrame(rows)


def _one_file(folder: Path, pattern: str, what: str, table_dir: Path) -> str:
    """The one file of `folder` whose name matches `pattern`, relative to `table_dir`."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    hits = [n for n in names if re.search(pattern, n)]
    if len(hits) != 1:
        raise ValueError(
            f"{folder}: {len(hits)} files match the {what} pattern {pattern!r} "
            f"({hits or names}); exactly one is needed"
        )
    return os.path.relpath(folder / hits[0], table_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder of case folders")
    parser.add_argument("table", help="the images table to write (.tsv)")
    parser.add_argument("--channel", action="append", metavar="NAME=REGEX",
                        help="a channel and its file-name pattern (repeat; default: BraTS "
                             "flair and t1c)")  # fmt: skip
    parser.add_argument("--mask", default=DEFAULT_MASK, help="the label map's file-name pattern")
    args = parser.parse_args(argv)
    channels = dict(c.split("=", 1) for c in args.channel) if args.channel else DEFAULT_CHANNELS
    table_path = Path(args.table)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table = case_table(args.root, table_path.parent, channels=channels, mask=args.mask)
    write_tsv(table, table_path)
    print(f"{table_path}: {table['patient_id'].nunique()} cases, channels {list(channels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
