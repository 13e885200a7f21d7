"""A small synthetic cohort for tests, and the PHI values planted in it."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import pydicom

from radflow.synth.cohort import CohortSpec, synthesize_cohort

# Small matrices at a coarse spacing keep a realistic field of view (about 200 mm).
SMALL = dict(min_matrix_px=192, max_matrix_px=256, pixel_spacing_mm=(0.8, 1.0))

PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "ReferringPhysicianName", "OperatorsName", "DeviceSerialNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
)  # fmt: skip


REPO = Path(__file__).resolve().parents[1]


def run_example(example: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on an example config shrunk by `workdir`/tiny.yaml (layered over
    config/config.yaml and `example`), 2 cores and one GPU slot; `args` appended."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config" / "config.yaml"), str(example),
           str(workdir / "tiny.yaml"), "--cores", "2", "--resources", "gpu=1", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def make_cohort(root: Path, n_patients: int = 24, seed: int = 1, threads: int = 2, **spec):
    paths = (root / "dicom", root / "labels.csv", root / "lesions.csv")
    synthesize_cohort(
        *paths,
        CohortSpec(n_patients=n_patients, seed=seed, **{**SMALL, **spec}),
        threads=threads,
        progress=False,
    )
    return paths


def planted_phi(dicom_dir: Path) -> set[str]:
    """Every identifying value written into the cohort's headers (long enough to be
    searched for without matching ordinary numbers or words by chance)."""
    values: set[str] = set()
    for path in sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                values.add(value)
                if "^" in value:  # names also appear as "Given Family" or "Family, Given"
                    family, given = value.split("^")[:2]
                    values.update({f"{given} {family}", f"{family}, {given}", family + given})
    return values


def text_of(path: Path) -> bytes:
    """A file's bytes, with the decompressed bytes appended for .gz (NIfTI), for PHI scans."""
    data = Path(path).read_bytes()
    if Path(path).suffix == ".gz":
        data += gzip.decompress(data)
    return data


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, to compare two writes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }
