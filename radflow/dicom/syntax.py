"""Transfer syntaxes: which ones radflow decodes, with which decoder, and why it cannot.

Decoding goes through pydicom's pixel backend with one *pinned* decoder per syntax, so a
file decodes to the same values on every machine whatever else is installed (pydicom
otherwise takes the first installed plugin, and plugins differ by +-1..3 on lossy JPEG):

| transfer syntax | decoder |
| --- | --- |
| implicit/explicit VR little endian, explicit big endian, deflated | pydicom |
| RLE lossless | pylibjpeg-rle (pydicom's own decoder if absent: same values) |
| JPEG baseline (process 1), extended 12-bit (2/4), lossless (14, 14 SV1) | pylibjpeg-libjpeg |
| JPEG-LS lossless and near-lossless | pylibjpeg-libjpeg |
| JPEG 2000 lossless and lossy, HTJ2K | pylibjpeg-openjpeg |

Any other syntax (MPEG-2/H.264/HEVC video, JPIP references, private vendor syntaxes) is
refused with a reason that names it; a syntax whose decoder package is not installed is
refused with a reason that names the package. README ("Dependencies") explains the choice.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

#: Decoder plugin (pydicom's label) used for each encapsulated syntax; "pylibjpeg" means
#: pylibjpeg with its libjpeg, openjpeg or rle plugin, whichever handles the syntax.
PINNED_PLUGIN = "pylibjpeg"

#: Packages to install when a syntax has no decoder (by pydicom decoder UID keyword).
_PACKAGES = {
    "JPEG2000": "pylibjpeg and pylibjpeg-openjpeg",
    "HTJ2K": "pylibjpeg and pylibjpeg-openjpeg",
    "RLE": "pylibjpeg and pylibjpeg-rle",
    "JPEG": "pylibjpeg and pylibjpeg-libjpeg",
}


class DecodeError(Exception):
    """Pixel data cannot be decoded; the message is the PHI-free reason (names the syntax)."""


def transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The dataset's transfer syntax: from its file meta, else (a file without meta) the
    encoding pydicom found when reading it (implicit/explicit VR, little/big endian)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid).strip())
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ExplicitVRLittleEndian
    if little:
        return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ExplicitVRBigEndian


def syntax_label(uid: str) -> str:
    """A readable name: the standard name, else "private transfer syntax <uid>" (a syntax
    UID names a vendor's encoding, never a patient or study)."""
    uid = UID(uid)
    if uid.is_transfer_syntax and uid.name != str(uid):
        return uid.name
    return f"{'private' if uid.is_private else 'unknown'} transfer syntax {uid}"


def _package_hint(uid: UID) -> str:
    name = uid.name.upper().replace(" ", "").replace("-", "")
    for key, packages in _PACKAGES.items():
        if key in name:
            return packages
    return "a decoder plugin for pydicom"


def syntax_problem(uid: str) -> str:
    """Why pixel data in this transfer syntax cannot be decoded here ("" if it can)."""
    uid = UID(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        what = " (video)" if "MPEG" in uid.name or "HEVC" in uid.name else ""
        return f"unsupported transfer syntax: {syntax_label(uid)}{what}"
    if not decoder.is_available:
        return (
            f"no decoder installed for {syntax_label(uid)}: install {_package_hint(uid)} "
            "(see README, Dependencies)"
        )
    return ""


def _plugin_for(uid: UID) -> str:
    """The pinned plugin when installed, else "" (pydicom picks among the installed ones)."""
    if not uid.is_encapsulated:
        return ""
    return PINNED_PLUGIN if PINNED_PLUGIN in get_decoder(uid).available_plugins else ""


def decode_pixels(ds: pydicom.Dataset, index: int | None = None) -> np.ndarray:
    """The stored pixel values of a dataset, decoded with the pinned decoder.

    Inputs: a dataset with pixel data; `index`, the 0-based frame of a multi-frame
    dataset to decode (None: all frames). Output: (rows, columns) for one frame, else
    (frames, rows, columns), signed or unsigned per PixelRepresentation, not rescaled.
    Nothing is cached on `ds`, so decoding frame after frame holds one frame at a time.
    Raises DecodeError naming the syntax if it is unsupported, its decoder is not
    installed or the decoder rejects the data.
    """
    uid = transfer_syntax(ds)
    problem = syntax_problem(uid)
    if problem:
        raise DecodeError(problem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = uid  # a file without meta: pydicom needs it to decode
    try:
        return np.asarray(pixel_array(ds, index=index, decoding_plugin=_plugin_for(uid)))
    except Exception as exc:  # the decoder's own complaint, reduced to one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise DecodeError(
            f"{syntax_label(uid)} pixel data could not be decoded ({detail})"[:240]
        ) from exc
