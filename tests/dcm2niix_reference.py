"""Run the dcm2niix binary on test DICOM files and compare radflow's NIfTI with its output
(the reference converter the conversion is judged against)."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def _dcm2niix() -> str | None:
    candidate = Path(sys.executable).parent / "dcm2niix"
    return str(candidate) if candidate.exists() else shutil.which("dcm2niix")


def run_dcm2niix_all(files: list[Path], tmp_path: Path) -> dict[str, nib.Nifti1Image]:
    """dcm2niix's outputs for `files` (copied to one folder): {file name: image}."""
    binary = _dcm2niix()
    if binary is None:
        pytest.skip("dcm2niix binary not installed (pip install dcm2niix)")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for n, path in enumerate(files):
        shutil.copy(path, src / f"{n:04d}.dcm")
    subprocess.run([binary, "-z", "y", "-f", "%s", "-o", str(out), str(src)], check=True,
                   capture_output=True)  # fmt: skip
    return {p.name: nib.load(p) for p in sorted(out.glob("*.nii.gz"))}


def run_dcm2niix(files: list[Path], tmp_path: Path) -> nib.Nifti1Image:
    """dcm2niix's only output for `files`."""
    produced = run_dcm2niix_all(files, tmp_path)
    assert len(produced) == 1, sorted(produced)
    return next(iter(produced.values()))


def assert_same_grid(ours: nib.Nifti1Image, ref: nib.Nifti1Image) -> None:
    """Same voxel grid after reorientation to RAS: shape, spacing within 1e-3 mm and the
    world coordinates of the corner voxel centres within 0.01 mm."""
    ours, ref = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    assert ours.shape[:3] == ref.shape[:3]
    np.testing.assert_allclose(ours.header.get_zooms()[:3], ref.header.get_zooms()[:3], atol=1e-3)
    corners = _corners(ours.shape)
    np.testing.assert_allclose(ours.affine @ corners, ref.affine @ corners, atol=0.01)


def _corners(shape) -> np.ndarray:
    return np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                     for k in (0, shape[2] - 1)], float).T  # fmt: skip


#: The NIfTI-1 header fields radflow replaces in dcm2niix's output (free text that may
#: carry PHI: dcm2niix writes the acquisition time into descrip).
REPLACED_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")


def raw_nifti(path: str | Path) -> tuple[nib.Nifti1Header, bytes]:
    """The header of a .nii or .nii.gz file as stored (nibabel's loaded image resets
    vox_offset, scl_slope and scl_inter) and the voxel bytes after vox_offset."""
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data))
    return header, data[int(header["vox_offset"]) :]


def assert_engine_output(ours_path: str | Path, ref_path: str | Path) -> None:
    """radflow's NIfTI is dcm2niix's bit for bit: the same stored header (data type, shape,
    pixdim, scl_slope/scl_inter, qform and sform, units...) except the REPLACED_FIELDS, which
    are "radflow <version>" and empty, at vox_offset 352 without extensions, and the same
    voxel bytes."""
    from radflow.dicom import radflow_version

    ours, ours_voxels = raw_nifti(ours_path)
    ref, ref_voxels = raw_nifti(ref_path)
    assert ours["descrip"].item() == f"radflow {radflow_version()}".encode()
    for name in REPLACED_FIELDS[1:]:
        assert ours[name].item() == b"", name
    assert int(ours["vox_offset"]) == 352
    assert ours_voxels == ref_voxels
    ours, ref = ours.copy(), ref.copy()
    for header in (ours, ref):
        for name in REPLACED_FIELDS:
            header[name] = b""
    assert ours.binaryblock == ref.binaryblock
