"""De-identification by construction: what DICOM header content may leave the private area.

radflow never copies a DICOM header wholesale. The only header values that reach a results
file are those named in `SIDECAR_WHITELIST` (written to each NIfTI's JSON sidecar) plus the
few descriptive columns of the index's series table (modality, size, photometric, pixel
spacing, body part, view position, manufacturer), all of which are also on the whitelist.

The whitelist follows the spirit of the DICOM PS3.15 Annex E Basic Application Level
Confidentiality Profile: keep device-independent acquisition parameters (tube voltage,
exposure, echo time, pixel spacing...), drop everything that names or dates a person or an
event or identifies an institution, device or instance: names, ids, dates, times, UIDs,
institution, station, device serial number, and every free-text description (series,
study, protocol, comments), which in practice often carries names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: DICOM keywords copied into the JSON sidecar of every converted image. Each is either a
#: coded string (CS), a number (DS/IS/US/SS/FL/FD) or a short device/technique string
#: (Manufacturer, ManufacturerModelName, RescaleType, ConvolutionKernel, FilterType) that
#: PS3.15 Annex E keeps. `test_deid.py` asserts none has a person-name, date, time, UID or
#: free-text VR; extend it only with keywords of the same kind.
SIDECAR_WHITELIST: tuple[str, ...] = (
    # what the image is
    "Modality",
    "ImageType",
    "PresentationIntentType",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PatientOrientation",
    "PatientPosition",
    # device (make and model only; never serial number, station or institution)
    "Manufacturer",
    "ManufacturerModelName",
    "DetectorType",
    # pixel encoding, as stored (before radflow's rescale and MONOCHROME1 inversion)
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    # geometry
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "GantryDetectorTilt",
    "ReconstructionDiameter",
    "EstimatedRadiographicMagnificationFactor",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "BodyPartThickness",
    "CompressionForce",
    # X-ray / CT technique
    "KVP",
    "Exposure",
    "ExposureInuAs",
    "ExposureTime",
    "XRayTubeCurrent",
    "ExposureIndex",
    "TargetExposureIndex",
    "DeviationIndex",
    "AnodeTargetMaterial",
    "FilterMaterial",
    "FilterType",
    "Grid",
    "ConvolutionKernel",
    "SpiralPitchFactor",
    # MR technique
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "ImagingFrequency",
    "PixelBandwidth",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    # PET/NM quantitation
    "Units",
    "DecayCorrection",
)

#: VRs that may never be whitelisted: they hold names, dates, times, UIDs, free text or
#: nested data whose content cannot be vetted keyword by keyword.
FORBIDDEN_VRS = frozenset(
    {"PN", "DA", "DT", "TM", "UI", "AS", "SQ", "LT", "ST", "UT", "UC", "UR", "OB", "OW", "UN"}
)

_FLOAT_VRS = frozenset({"DS", "FL", "FD", "OF", "OD"})
_INT_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})


def _scalar(value: Any, vr: str) -> float | int | str | None:
    """One DICOM value as a JSON scalar; None when empty or not representable."""
    if value is None or value == "":
        return None
    if vr in _FLOAT_VRS:
        try:
            x = float(value)
        except (TypeError, ValueError):
            return None
        return x if math.isfinite(x) else None  # JSON has no NaN/inf
    if vr in _INT_VRS:
        try:
            return int(value)
        except (TypeError, ValueError):
            try:  # IS written as "4.0" by some devices
                x = float(value)
            except (TypeError, ValueError):
                return None
            return int(x) if x.is_integer() else x
    if isinstance(value, bytes):
        return None
    text = str(value).strip()
    return text or None


def sidecar_fields(dataset: Dataset) -> dict[str, Any]:
    """The whitelisted header values of `dataset` as a JSON-serialisable dict.

    Input: a pydicom Dataset (header only is enough). Output: {keyword: value} for every
    keyword in `SIDECAR_WHITELIST` present with a non-empty value; numbers become float
    (DS, FL, FD) or int (IS, US...), strings are stripped, multi-valued elements become
    lists. Units are DICOM's (mm, ms, kV, mAs, T...). Nothing else from the header is read.
    """
    out: dict[str, Any] = {}
    for keyword in SIDECAR_WHITELIST:
        if keyword not in dataset:
            continue
        elem = dataset[keyword]
        if elem.value is None:
            continue
        vr = elem.VR
        if vr in FORBIDDEN_VRS:  # a private re-definition cannot smuggle data in
            continue
        value = elem.value
        if isinstance(value, (MultiValue, list, tuple)):
            items = [_scalar(v, vr) for v in value]
            items = [v for v in items if v is not None]
            if items:
                out[keyword] = items
        else:
            scalar = _scalar(value, vr)
            if scalar is not None:
                out[keyword] = scalar
    return out


def whitelist_vrs() -> dict[str, str]:
    """{keyword: VR} of the whitelist, from pydicom's data dictionary (for tests/audits)."""
    return {k: dictionary_VR(tag_for_keyword(k)) for k in SIDECAR_WHITELIST}


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while reading: its validation warnings and log messages quote element
    values ("Invalid value for VR DA: '19230817'"), which would put PHI into job logs.

    Inside the block value validation is off, warnings are ignored and the "pydicom" logger
    only passes CRITICAL; all three are restored afterwards.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    mode = pydicom_config.settings.reading_validation_mode
    try:
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = mode
        logger.setLevel(level)
