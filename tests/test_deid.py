"""The sidecar whitelist keeps acquisition parameters and nothing identifying."""

from __future__ import annotations

import json
import warnings

import pydicom

from radflow.deid import FORBIDDEN_VRS, SIDECAR_WHITELIST, sidecar_fields, whitelist_vrs

from dicom_factory import PHI_MARKER, planted_values, write_projection, write_volume


def test_whitelist_has_no_identifying_vr_or_keyword():
    vrs = whitelist_vrs()
    assert set(vrs) == set(SIDECAR_WHITELIST)
    assert len(SIDECAR_WHITELIST) == len(set(SIDECAR_WHITELIST))
    assert not {k: v for k, v in vrs.items() if v in FORBIDDEN_VRS}
    for word in ("Name", "ID", "Date", "Time", "UID", "Institution", "Station", "Serial",
                 "Description", "Comment", "Address", "Birth", "Age", "Sex"):  # fmt: skip
        hits = {k for k in SIDECAR_WHITELIST if word in k}
        # durations, not timestamps; the device model, not a person
        allowed = {"ExposureTime", "EchoTime", "RepetitionTime", "InversionTime",
                   "ManufacturerModelName"}  # fmt: skip
        assert hits <= allowed, (word, hits - allowed)


def test_engine_sidecar_fields_have_no_identifying_keyword():
    """The fields of dcm2niix's own sidecar that radflow keeps: acquisition parameters,
    none of the names, dates, times of day, UIDs or device ids dcm2niix also writes."""
    from radflow.dicom.convert import ENGINE_SIDECAR_FIELDS

    assert len(ENGINE_SIDECAR_FIELDS) == len(set(ENGINE_SIDECAR_FIELDS))
    durations = {"EchoTime", "RepetitionTime", "InversionTime", "SliceTiming",
                 "TotalReadoutTime", "EstimatedTotalReadoutTime"}  # fmt: skip
    for word in ("Name", "ID", "Date", "Time", "UID", "Institution", "Station", "Serial",
                 "Description", "Comment", "Address", "Birth", "Age", "Sex", "Protocol",
                 "Department", "Physician", "Operator", "Series", "Study"):  # fmt: skip
        hits = {k for k in ENGINE_SIDECAR_FIELDS if word in k}
        assert hits <= durations, (word, hits - durations)
    for field in ("InstitutionName", "StationName", "DeviceSerialNumber", "SeriesDescription",
                  "ProtocolName", "AcquisitionTime", "AcquisitionDateTime", "PatientName"):  # fmt: skip
        assert field not in ENGINE_SIDECAR_FIELDS


def test_sidecar_fields_types_and_no_phi(tmp_path):
    path = write_projection(
        tmp_path / "dx.dcm",
        patient_id=f"{PHI_MARKER}P1",
        accession=f"{PHI_MARKER}A1",
        slope=2,
        intercept=-100.5,
        pixel_spacing=(0.15, 0.1),
        extra={"WindowCenter": ["100", "200"], "ExposureTime": "12", "SliceThickness": ""},
    )
    ds = pydicom.dcmread(path)
    fields = sidecar_fields(ds)
    assert fields["Modality"] == "DX"
    assert fields["KVP"] == 110.0 and isinstance(fields["KVP"], float)
    assert fields["Exposure"] == 4 and isinstance(fields["Exposure"], int)
    assert fields["ExposureTime"] == 12
    assert fields["PixelSpacing"] == [0.15, 0.1]
    assert fields["ImagerPixelSpacing"] == [0.15, 0.1]
    assert fields["WindowCenter"] == [100.0, 200.0]
    assert fields["RescaleSlope"] == 2.0 and fields["RescaleIntercept"] == -100.5
    assert fields["BitsStored"] == 12 and fields["PixelRepresentation"] == 0
    assert "SliceThickness" not in fields  # empty values are dropped
    assert set(fields) <= set(SIDECAR_WHITELIST)
    text = json.dumps(fields, allow_nan=False)
    assert PHI_MARKER.lower() not in text.lower()
    for value in planted_values():
        assert value not in text


def test_sidecar_fields_mr_and_nan(tmp_path):
    paths = write_volume(tmp_path, patient_id="ZQXP", accession="ZQXA", modality="MR", n_slices=1)
    ds = pydicom.dcmread(paths[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.InversionTime = "NaN"  # some exports carry it; JSON has no NaN
    fields = sidecar_fields(ds)
    assert fields["MagneticFieldStrength"] == 3.0
    assert fields["EchoTime"] == 12.0 and fields["RepetitionTime"] == 500.0
    assert "InversionTime" not in fields
    json.dumps(fields, allow_nan=False)


def test_pydicom_messages_are_silenced(tmp_path, caplog, recwarn):
    """pydicom warns *and logs* about invalid values on read, some messages quoting the
    value; radflow's readers must emit none of them."""
    from pydicom import config
    from pydicom.dataelem import DataElement

    from radflow.dicom.convert import convert_unit
    from radflow.dicom.index import read_file_record

    path = write_projection(tmp_path / "dx.dcm", patient_id="ZQXP9", accession="ZQXA9")
    ct = write_volume(tmp_path / "ct", patient_id="ZQXP8", accession="ZQXA8", n_slices=2)
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for file in [path, *ct]:
            ds = pydicom.dcmread(file)
            ds.add(DataElement(0x00080050, "SH", "ZQX" * 10))  # AccessionNumber, > 16 chars
            ds.add(DataElement(0x00100010, "PN", "ZQX" * 30))  # PatientName component > 64
            ds.save_as(file, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    caplog.clear()
    recwarn.clear()
    caplog.set_level("DEBUG")
    rec = read_file_record(str(tmp_path), "dx.dcm", "PatientName", "AccessionNumber")
    assert rec.reason == "" and rec.label_value == "ZQX" * 10
    row = convert_unit("ser-x", "DX", ["dx.dcm"], tmp_path, tmp_path / "out")
    assert (row["status"], row["route"]) == ("ok", "radflow")
    rels = [p.relative_to(tmp_path).as_posix() for p in ct]
    row = convert_unit("ser-y", "CT", rels, tmp_path, tmp_path / "out")
    assert (row["status"], row["route"]) == ("ok", "dcm2niix")
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text
    assert not [w for w in recwarn if "pydicom" in w.filename]
    # without the guard the same read does log (so the test above tests something)
    caplog.clear()
    pydicom.dcmread(path).AccessionNumber  # noqa: B018
    assert [r for r in caplog.records if r.name.startswith("pydicom")]
