"""Input file trees: listing (hidden files skipped, links followed once) and a cheap
fingerprint that changes when a file is added, removed or replaced. Used at workflow
parse time for any input folder (a DICOM export today)."""

from __future__ import annotations

import os
from pathlib import Path


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


def files_fingerprint(root: str | os.PathLike, files: list[str]) -> str:
    """A short hash of (path, size, modification time) of the named files (relative to
    `root`, or absolute); a missing file hashes as missing. Used for the files a table
    names (an images table's images, a masks table's masks): a replaced file reruns the
    index even though the table itself did not change."""
    import hashlib

    digest = hashlib.sha256()
    for rel in files:
        try:
            stat = os.stat(os.path.join(root, rel))
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}\0missing\n".encode())
    return digest.hexdigest()[:16]
