"""What every synthetic DICOM export of radflow shares, whatever the images: fake
identities, UIDs and study-level header fields, the file layout of a PACS export, writing
the files and tables, the parallel map over patients, and the non-image objects a real
export contains.

Everything here is a function of the seed or of the generator passed in; the same draws in
the same order give the same bytes, so the cohorts built on it are byte-identical for a
seed whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

SURNAMES = [
    "Moreau",
    "Okafor",
    "Lindqvist",
    "Tanaka",
    "Novak",
    "Garcia",
    "Haddad",
    "Kowalski",
    "Nguyen",
    "Fischer",
    "Rossi",
    "Silva",
    "Dubois",
    "Kaur",
    "Jensen",
    "Mensah",
]
GIVEN_NAMES = [
    "Ana",
    "Jonas",
    "Mei",
    "Kwame",
    "Ines",
    "Lars",
    "Priya",
    "Omar",
    "Sofia",
    "Tomasz",
    "Yuki",
    "Amara",
    "Felix",
    "Leila",
    "Mateo",
    "Zofia",
]
INSTITUTIONS = [
    "St. Elsewhere General Hospital",
    "Riverside Imaging Centre",
    "Northfield University Clinic",
]


def uid(seed: int, *parts: object) -> str:
    """A DICOM UID that is a function of the seed and `parts` only."""
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def patient_identity(seed: int, patient_index: int) -> dict:
    """Fake PHI of one patient (the same in all the patient's studies)."""
    rng = np.random.default_rng([seed, patient_index, 7])
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    return {
        "PatientName": f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN_NAMES)}",
        "PatientID": f"{rng.integers(0, 10**10):010d}",  # leading zeros are common in MRNs
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M"])),
        "InstitutionName": str(rng.choice(INSTITUTIONS)),
    }


def study_fields(rng: np.random.Generator, study_index: int, station_prefix: str) -> dict:
    """Fake study-level header fields (dates, accession, staff, station), drawn from `rng`
    in a fixed order: date, accession, time, study id, referring physician, operator,
    station, device serial number."""
    study_date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3000)))
    date = study_date.strftime("%Y%m%d")
    accession = f"ACC{int(rng.integers(10**6, 10**7))}{study_index}"
    time = f"{int(rng.integers(7, 19)):02d}1530"
    return {
        "StudyDate": date,
        "SeriesDate": date,
        "ContentDate": date,
        "AccessionNumber": accession,
        "StudyTime": time,
        "SeriesTime": time,
        "ContentTime": time,
        "StudyID": str(int(rng.integers(1, 99999))),
        "ReferringPhysicianName": f"Dr^{rng.choice(SURNAMES)}",
        "OperatorsName": f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN_NAMES)}",
        "StationName": f"{station_prefix}{int(rng.integers(1, 9))}",
        "DeviceSerialNumber": f"SN{int(rng.integers(10**5, 10**6))}",
    }


def decimal_string(value: float, decimals: int = 4) -> str:
    """A DICOM decimal string (DS) with at most `decimals` decimals."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def later_time(hhmmss: str, minutes: float) -> str:
    """A DICOM time (HHMMSS) `minutes` after `hhmmss`."""
    t = dt.datetime(2000, 1, 1, int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:6]))
    return (t + dt.timedelta(minutes=minutes)).strftime("%H%M%S")


def patient_age(birth_date: str, study_date: str) -> str:
    """The DICOM age string (e.g. "064Y") of a patient born on `birth_date` at
    `study_date` (both YYYYMMDD)."""
    age = int(study_date[:4]) - int(birth_date[:4]) - (study_date[4:] < birth_date[4:])
    return f"{age:03d}Y"


def dataset_from(fields: dict) -> Dataset:
    ds = Dataset()
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


def _file_meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def write_dataset(ds: Dataset, syntax: str, path: Path) -> None:
    """Save `ds` as a DICOM file (preamble, file meta) in transfer syntax `syntax`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta = _file_meta(ds, syntax)
    ds.save_as(
        path,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=True,
        enforce_file_format=True,
    )


def write_series(datasets: Iterable[Dataset], syntax: str, paths: Sequence[Path]) -> None:
    """Save each dataset to its path (as `write_dataset`); a path already written (random
    names collide once in millions) is an error, never overwritten."""
    for ds, path in zip(datasets, paths, strict=True):
        if path.exists():
            raise FileExistsError(f"{path} written twice; choose another seed")
        write_dataset(ds, syntax, path)


def require_empty(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, after checking it is empty or absent: a synthetic cohort is
    never written into an existing one."""
    out = Path(folder)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} already holds files; radflow does not write a synthetic cohort into an "
            "existing folder. Point it at an empty one."
        )
    return out


def random_folder(rng: np.random.Generator) -> Path:
    """One to three nested folders with random hex names, as PACS exports write them."""
    depth = int(rng.integers(1, 4))
    return Path(*[f"{rng.integers(16**4):04X}" for _ in range(depth)])


def random_file_name(rng: np.random.Generator) -> str:
    """A random image file name, with ".dcm" half of the time."""
    name = f"IM{rng.integers(16**8):08x}"
    return name + ".dcm" if rng.random() < 0.5 else name


def random_relpath(rng: np.random.Generator) -> Path:
    return random_folder(rng) / random_file_name(rng)


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Sequence]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def map_jobs(
    function: Callable,
    jobs: Sequence,
    *,
    workers: int = 1,
    chunksize: int = 1,
    progress: bool = False,
    unit: str = "study",
) -> list:
    """[function(job) for job in jobs], in `workers` processes when more than one."""
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(function, jobs, chunksize=chunksize)
            return list(_progress(results, len(jobs), progress, unit))
    return list(_progress(map(function, jobs), len(jobs), progress, unit))


def _progress(iterable, total: int, enabled: bool, unit: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="synthesize", unit=unit, mininterval=2)


def write_junk(
    seed: int,
    dicom_dir: Path,
    first_study: dict,
    n_junk_files: int,
    min_victim_bytes: int = 100_000,
) -> None:
    """Objects a real export contains besides images, the first `n_junk_files` of: a
    structured report (non-image DICOM) in `first_study` ("study_uid", "identity",
    "accession"), a stray text file and a DICOM file (the first image file "IM*" in sorted
    order larger than `min_victim_bytes`) cut short mid-pixel-data."""
    rng = np.random.default_rng([seed, 99])
    if n_junk_files < 1:
        return
    sr = Dataset()
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = uid(seed, "sr")
    sr.StudyInstanceUID = first_study["study_uid"]
    sr.SeriesInstanceUID = uid(seed, "sr-series")
    sr.Modality = "SR"
    sr.update(dataset_from(first_study["identity"]))
    sr.AccessionNumber = first_study["accession"]
    sr.ValueType = "CONTAINER"
    write_dataset(sr, ExplicitVRLittleEndian, dicom_dir / random_relpath(rng))
    if n_junk_files < 2:
        return
    (dicom_dir / "EXPORT_NOTES.txt").write_text("Exported by the PACS. Not a DICOM file.\n")
    if n_junk_files < 3:
        return
    # one file cut short mid-pixel-data, as an interrupted transfer leaves it: its header
    # still reads, so the index keeps it and conversion must fail cleanly
    victim = next(p for p in sorted(dicom_dir.rglob("IM*")) if p.stat().st_size > min_victim_bytes)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
