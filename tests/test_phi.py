"""No PHI from DICOM headers reaches any file the workflow writes after the index stage.

A messy export (tests/dicom_factory.build_export) gets extra PHI planted in every header
field a PACS export commonly fills with identifying text: names of staff, addresses,
phone numbers, free-text descriptions and comments, dates and times, private tags and
nested sequences. The real Snakemake workflow then indexes, converts and preprocesses it
(`--until preprocess`), and every file under results/ (tables, NIfTI headers and data,
sidecars, manifests, logs) and Snakemake's own log is searched for every planted value,
the PHI marker and every folder and file name of the export.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import dicom_factory as F

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.workflow

#: Extra identifying values, each unique and searchable (all carry the PHI marker).
EXTRA_PHI = {
    "OtherPatientIDs": "ZQXOTHERID77",
    "PatientAddress": "12 Zqxlane, Plimpton",
    "PatientTelephoneNumbers": "ZQX 555 0199",
    "OperatorsName": "Zqxoperator^Ida",
    "PerformingPhysicianName": "Zqxperformer^Ole",
    "RequestingPhysician": "Zqxrequester^Ann",
    "NameOfPhysiciansReadingStudy": "Zqxreader^Bo",
    "StudyDescription": "ZQX chest for Mrs Zqxbottom",
    "ProtocolName": "ZQX protocol of ward 7",
    "ImageComments": "ZQX call Dr Zqxcaller on 4471",
    "PatientComments": "ZQX allergic to everything",
    "AdditionalPatientHistory": "ZQX history text",
    "InstitutionAddress": "ZQX 1 Hospital Road",
    "InstitutionalDepartmentName": "ZQX Radiology West",
    "InstitutionCodeSequence": None,  # filled below (a sequence)
    "AcquisitionDateTime": "20190422134207.123456",
    "ContentDate": "20190423",
    "PatientAge": "095Y",
}
PRIVATE_TEXT = "ZQX private vendor field: patient Zqxbottom"
NESTED_TEXT = "ZQXREQ-4711"


def plant_extra_phi(path: Path) -> bool:
    """Add EXTRA_PHI, a private block and a nested sequence to one DICOM file, in place.
    Returns False for files pydicom cannot read (corrupt, not DICOM, DICOMDIR)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        return False
    if "DirectoryRecordSequence" in ds:
        return False
    for keyword, value in EXTRA_PHI.items():
        if value is not None:
            setattr(ds, keyword, value)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "ZQX-INST-9", "L"
    code.CodeMeaning = "ZQX Institution code"
    ds.InstitutionCodeSequence = DicomSequence([code])
    request = Dataset()
    request.RequestedProcedureID = NESTED_TEXT
    request.ScheduledProcedureStepID = NESTED_TEXT + "-S"
    ds.RequestAttributesSequence = DicomSequence([request])
    block = ds.private_block(0x0029, "ZQX VENDOR", create=True)
    block.add_new(0x10, "LO", PRIVATE_TEXT)
    ds.save_as(path, enforce_file_format=True)
    return True


def planted() -> set[str]:
    values = {v for v in EXTRA_PHI.values() if v} | {PRIVATE_TEXT, NESTED_TEXT, "ZQX-INST-9"}
    values |= F.planted_values()
    return {v for v in values if len(v) >= 6}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phi")
    info = F.build_export(tmp / "export")
    root = info["root"]
    rels = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    n_planted = sum(plant_extra_phi(root / rel) for rel in rels)
    assert n_planted >= 10
    labels = F.write_labels(tmp / "labels.csv", info["labels"], ["AccessionNumber", "label"])
    config = tmp / "own.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "synthesize": {"enabled": False},
                "data": {
                    "dicom_root": str(root),
                    "labels_table": str(labels),
                    "label_column": "label",
                    "positive_value": "1",
                    "annotations_table": None,
                },
                "deid": {"key_file": str(tmp / "secret" / "study.key")},
                "shards": 2,
            }
        )
    )
    workdir = tmp / "study"
    workdir.mkdir()
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(REPO / "config" / "config.yaml"), str(config),
        "--cores", "2", "--until", "preprocess",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, rels, done.stdout + done.stderr


def _outputs(workdir: Path) -> list[Path]:
    files = [p for p in (workdir / "results").rglob("*") if p.is_file()]
    return files + [p for p in (workdir / ".snakemake" / "log").rglob("*") if p.is_file()]


def test_stages_ran_and_wrote_images(ingested):
    workdir, _, _ = ingested
    niftis = list((workdir / "results" / "nifti").rglob("*.nii.gz"))
    assert len(niftis) >= 4  # A, B, the CT, the MR and D's two views are labelled units
    assert list((workdir / "results" / "preprocessed").rglob("*.npy"))


def test_no_planted_phi_or_export_path_in_any_output(ingested):
    workdir, rels, console = ingested
    needles = planted()
    needles |= {rel for rel in rels} | {p for rel in rels for p in Path(rel).parts if len(p) >= 4}
    needles -= {"DICOMDIR"}  # the quarantine reason names the object type
    assert len(needles) > 40
    leaks = []
    for path in _outputs(workdir):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data += gzip.decompress(data)
        text = data.decode("latin-1")
        if F.PHI_MARKER.lower() in text.lower():
            leaks.append(f"{path.relative_to(workdir)}: PHI marker")
        leaks.extend(f"{path.relative_to(workdir)}: {n}" for n in needles if n in text)
    for needle in needles:  # the run's console output goes to users' terminals and CI logs
        if needle in console:
            leaks.append(f"console: {needle}")
    assert not leaks, "PHI found:\n" + "\n".join(leaks[:30])


def test_nifti_free_text_header_fields_are_radflow_only(ingested):
    workdir, _, _ = ingested
    for path in (workdir / "results" / "nifti").rglob("*.nii.gz"):
        header = nib.load(path).header
        assert header["descrip"].tobytes().rstrip(b"\0").startswith(b"radflow ")
        for field in ("intent_name", "aux_file", "db_name"):
            assert header[field].tobytes().strip(b"\0") == b"", (path.name, field)
        assert not nib.load(path).header.extensions  # no DICOM header embedded
