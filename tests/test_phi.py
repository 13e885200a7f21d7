"""No PHI from DICOM headers reaches any file the workflow writes after the index stage.

A messy export (tests/dicom_factory.build_export) gets extra PHI planted in every header
field a PACS export commonly fills with identifying text: names of staff, addresses,
phone numbers, free-text descriptions and comments, dates and times, private tags and
nested sequences. The real Snakemake workflow then indexes, converts and preprocesses it
(`--until preprocess`), and every file under results/ (tables, NIfTI headers and data,
sidecars, manifests, logs) and Snakemake's own log is searched for every planted value,
the PHI marker and every folder and file name of the export. The same is done for a
second export of multi-series brain MR cases (two channels on one grid) with
ground-truth masks: a NIfTI label image and a DICOM SEG, whose headers highdicom copies
from the planted series, named and filed under names that carry PHI.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from radflow import conventions as C

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


def _radiograph_export(tmp: Path) -> tuple[Path, dict, set[str]]:
    """The messy export (radiographs, CT, MR, non-images) with its labels table."""
    info = F.build_export(tmp / "export")
    labels = F.write_labels(tmp / "labels.csv", info["labels"], ["AccessionNumber", "label"])
    data = {"labels_table": str(labels), "label_column": "label", "positive_value": "1"}
    return info["root"], data, set()


def _mr_case_export(tmp: Path) -> tuple[Path, dict, set[str]]:
    """Two brain MR studies (FLAIR + T1 post-contrast + a localizer, descriptions full of
    PHI), one with a world-space NIfTI mask, one with a DICOM SEG that highdicom writes from
    the planted FLAIR (copying its patient and study attributes); the masks table is keyed
    by AccessionNumber, the masks' folder and names carry PHI."""
    import highdicom as hd
    import nibabel as nib
    import numpy as np
    from pydicom.sr.codedict import codes

    root, masks = tmp / "export", tmp / "Zqx_masks_of_Zqxbottom"
    masks.mkdir()
    rows = []
    for i in range(2):
        patient, accession, study = f"ZQXMRPAT{i}", f"ZQXMRACC{i}", F.new_uid()
        folder = root / f"Zqx_Doe_{i}"
        flair = F.write_volume(folder / "Zqx_s1", patient_id=patient, accession=accession,
                               study_uid=study, modality="MR", n_slices=4, intercept=0,
                               extra={"SeriesDescription": "ZQX FLAIR for Mrs Zqxbottom"})  # fmt: skip
        F.write_volume(folder / "Zqx_s2", patient_id=patient, accession=accession, study_uid=study,
                       modality="MR", n_slices=6, slice_gap=1.5, pixel_spacing=(0.6, 0.5),
                       intercept=0, extra={"SeriesDescription": "ZQX T1 post gad Zqxsmith"})  # fmt: skip
        F.write_volume(folder / "Zqx_s3", patient_id=patient, accession=accession, study_uid=study,
                       modality="MR", n_slices=2, extra={"SeriesDescription": "ZQX scout"})  # fmt: skip
        for path in flair:
            plant_extra_phi(path)
        if i == 0:
            affine = np.diag([-0.5, -0.5, 1.0, 1.0])
            affine[:3, 3] = (28.0, 38.0, 16.0)
            label = np.zeros((12, 12, 6), np.uint8)
            label[2:5, 3:6, 1:3] = 1
            name = masks / "Zqx_mask_Zqxbottom.nii.gz"
            nib.save(nib.Nifti1Image(label, affine), name)
        else:
            sources = sorted((pydicom.dcmread(p) for p in flair),
                             key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
            pixels = np.zeros((4, 12, 10, 1), np.uint8)
            pixels[1:3, 2:5, 2:4] = 1
            segment = hd.seg.SegmentDescription(
                segment_number=1, segment_label="ZQX lesion of Zqxbottom",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )  # fmt: skip
            name = masks / "Zqx_seg_Zqxsmith.dcm"
            hd.seg.Segmentation(
                source_images=sources, pixel_array=pixels, segmentation_type="BINARY",
                segment_descriptions=[segment], series_instance_uid=F.new_uid(),
                series_number=99, sop_instance_uid=F.new_uid(), instance_number=1,
                manufacturer="ZQX lab", manufacturer_model_name="ZQX tool",
                software_versions="1", device_serial_number="ZQX-SN-1",
                content_creator_name="Zqxcreator^Eve", content_description="ZQX by hand",
            ).save_as(name)  # fmt: skip
        rows.append((accession, str(name.relative_to(tmp))))
    table = F.write_labels(tmp / "masks.csv", rows, ["AccessionNumber", "mask"])
    data = {"labels_table": None, "case_key": "StudyInstanceUID", "masks_table": str(table),
            "masks_key": "AccessionNumber",
            "channels": {"flair": "(?i)flair", "t1c": "(?i)(post|gad)"}}  # fmt: skip
    secrets = {masks.name, "Zqx_mask_Zqxbottom", "Zqx_seg_Zqxsmith", "Zqxcreator", "ZQX-SN-1"}
    return root, data, secrets


EXPORTS = {"radiographs": _radiograph_export, "mr_cases": _mr_case_export}


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def ingested(request, tmp_path_factory):
    """(workdir, relative paths and other names to search for, console output, export)."""
    tmp = tmp_path_factory.mktemp(f"phi_{request.param}")
    root, data, secrets = EXPORTS[request.param](tmp)
    rels = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    n_planted = sum(plant_extra_phi(root / rel) for rel in rels)
    assert n_planted >= 10
    config = tmp / "own.yaml"
    settings = {
        "synthesize": {"enabled": False},
        "data": {"dicom_root": str(root), "annotations_table": None, **data},
        "deid": {"key_file": str(tmp / "secret" / "study.key")},
        "shards": 2,
    }
    if request.param == "mr_cases":
        settings["preprocess"] = {"target_shape_px": [8, 8, 8]}
    config.write_text(yaml.safe_dump(settings))
    workdir = tmp / "study"
    workdir.mkdir()
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(REPO / "config" / "config.yaml"), str(config),
        "--cores", "2", "--until", "preprocess",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, rels + sorted(secrets), done.stdout + done.stderr, request.param


def _outputs(workdir: Path) -> list[Path]:
    files = [p for p in (workdir / "results").rglob("*") if p.is_file()]
    return files + [p for p in (workdir / ".snakemake" / "log").rglob("*") if p.is_file()]


def test_stages_ran_and_wrote_images(ingested):
    workdir, _, _, export = ingested
    niftis = list((workdir / "results" / "nifti").rglob("*.nii.gz"))
    if export == "radiographs":
        assert len(niftis) >= 4  # A, B, the CT, the MR and D's two views are labelled units
    else:  # two cases of two channels, each with its mask (one NIfTI, one DICOM SEG)
        masks = [p for p in niftis if p.name.endswith(C.MASK_SUFFIX)]
        assert len(niftis) == 4 and len(masks) == 2
        for mask in masks:
            assert nib.load(mask).get_fdata().sum() > 0
        sidecars = [
            json.loads(p.read_text()) for p in (workdir / "results" / "nifti").rglob("*.json")
        ]
        assert sorted(s["mask_source"] for s in sidecars) == ["DICOM SEG", "label image"]
        assert all(s["channels"] == ["flair", "t1c"] for s in sidecars)
    assert list((workdir / "results" / "preprocessed").rglob("*.npy"))


def test_no_planted_phi_or_export_path_in_any_output(ingested):
    workdir, rels, console, _ = ingested
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
    workdir, _, _, _ = ingested
    for path in (workdir / "results" / "nifti").rglob("*.nii.gz"):
        header = nib.load(path).header
        assert header["descrip"].tobytes().rstrip(b"\0").startswith(b"radflow ")
        for field in ("intent_name", "aux_file", "db_name"):
            assert header[field].tobytes().strip(b"\0") == b"", (path.name, field)
        assert not nib.load(path).header.extensions  # no DICOM header embedded
