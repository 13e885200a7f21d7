"""DICOM input: read headers (`headers`), group files into image units (`units`), index a
raw export (`index`), convert units to NIfTI with dcm2niix as the engine (`engine`,
`convert`) or radflow's own reader where dcm2niix is wrong (`reader`), and write/read
NIfTI (`nifti`)."""

from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path


@functools.cache  # read once per process: importlib.metadata parses the package metadata
def radflow_version() -> str:
    """The radflow version, e.g. "0.1.0": the installed distribution's, else (radflow used
    from the workflow folder, as in the per-stage conda environments, which do not install
    it) the one in the pyproject.toml beside the package; "unknown" if neither exists."""
    try:
        return metadata.version("radflow")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
    except OSError:
        return "unknown"
    return match[1] if match else "unknown"
