"""DICOM input: index a raw export (`index`), convert image units to NIfTI (`convert`) and
read converted images back in DICOM display order (`nifti`)."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache  # read once per process: importlib.metadata parses the package metadata
def radflow_version() -> str:
    """The installed radflow version, e.g. "0.1.0" ("unknown" when not installed)."""
    try:
        return metadata.version("radflow")
    except metadata.PackageNotFoundError:
        return "unknown"
