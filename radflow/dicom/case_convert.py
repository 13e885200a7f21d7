"""Convert a multi-series DICOM case (`radflow.dicom.cases`) to the layout an images
table's case has: `<pid>.nii.gz` with the channels on the 4th axis on the reference
channel's grid, `<pid>_mask.nii.gz` beside it, one PHI-free sidecar.

Each channel's series converts exactly as a lone series would (`convert_unit`: dcm2niix
or radflow's reader, chosen per series and recorded per channel in the sidecar). A case
of one channel keeps that output as it is (plus its mask); with several, the reference
channel's voxels and affine are kept (its channel of the stacked image equals its own
conversion), the others are resampled onto its grid (linear; `radflow.cases`).

The mask, a label image file (NIfTI, MetaImage, NRRD: any grid, in world space) or a
DICOM SEG (placed through its source series, `radflow.dicom.seg`), is carried onto the
reference grid by `radflow.cases.mask_onto`: copied when the grids agree, else nearest
neighbour, and the case fails (listed in the manifest with the reason) when the mask's
foreground does not lie inside the image.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from radflow import conventions as C
from radflow.cases import mask_onto, read_volume, stack_channels, write_case
from radflow.deid import SIDECAR_WHITELIST
from radflow.dicom import radflow_version
from radflow.dicom.convert import (
    MANIFEST_COLUMNS,
    _fmt,
    _short_error,
    _write_json,
    convert_unit,
)
from radflow.dicom.engine import dcm2niix_version
from radflow.dicom.reader import ConversionError
from radflow.dicom.seg import seg_label_image

#: Anything shaped like a DICOM UID is cut from an unexpected error's message.
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def _mask_image(mask: str, source_paths: Sequence[str], mask_labels: Mapping[str, int] | None):
    """A mask file as a SimpleITK label image in world space: a label image file as it
    is, a DICOM SEG on its source series (`source_paths`)."""
    from radflow.images import VOLUME_SUFFIXES

    if mask.lower().endswith(VOLUME_SUFFIXES):
        return read_volume(mask), "label image"
    return seg_label_image(mask, source_paths, mask_labels), "DICOM SEG"


def convert_case(
    series_pid: str,
    channels: Sequence[dict[str, Any]],
    mask: str,
    mask_channel: str,
    dicom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    compression_level: int = 6,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
    mask_labels: Mapping[str, int] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Convert one case; never raises for a bad case. Returns its manifest row.

    channels: in channel order, the reference first, each {"name", "modality", "paths"
    (relative to `dicom_root`), "keys" (`conventions.UNIT_KEYS`)}. mask: the mask file's
    absolute path or ""; mask_channel: the channel whose series a DICOM SEG references.
    Outputs in `out_dir`: `<series_pid>.nii.gz`, `.json`, `_mask.nii.gz` (and a lone
    diffusion channel's `.bval`/`.bvec`); stale ones are removed if the case fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / f"{series_pid}{s}" for s in (C.NIFTI_SUFFIX, C.SIDECAR_SUFFIX,
                                                  C.MASK_SUFFIX, ".bval", ".bvec")]  # fmt: skip
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row[C.SERIES_PID] = series_pid
    names = [ch["name"] for ch in channels]
    try:
        with tempfile.TemporaryDirectory(prefix="radflow-case-") as work:
            single = len(channels) == 1
            converted = []  # (path, manifest row, sidecar) per channel
            for index, ch in enumerate(channels):
                pid = series_pid if single else f"channel{index}"
                folder = out if single else Path(work)
                unit = convert_unit(pid, ch["modality"], ch["paths"], dicom_root, folder,
                                    compression_level if single else 1, ch["keys"],
                                    uneven_spacing, gantry_tilt, threads)  # fmt: skip
                what = f"channel {ch['name']}: " if ch["name"] else ""
                if unit[C.STATUS] != C.STATUS_OK:
                    raise ConversionError(f"{what}{unit[C.REASON]}")
                if int(unit["ndim"]) == 4:
                    raise ConversionError(f"{what}a 4D image ({unit['shape']}): a case's "
                                          "channels must be 2D or 3D images")  # fmt: skip
                path = folder / f"{pid}{C.NIFTI_SUFFIX}"
                sidecar = json.loads((folder / f"{pid}{C.SIDECAR_SUFFIX}").read_text())
                converted.append((str(path), unit, sidecar))
            reference, data, resampled = stack_channels([p for p, _, _ in converted])
            import nibabel as nib

            affine = nib.load(converted[0][0]).affine  # the reference's own, bit for bit
            mask_array, mask_notes = None, {}
            if mask:
                source_paths = [os.path.join(dicom_root, p) for ch in channels
                                if ch["name"] == mask_channel for p in ch["paths"]]  # fmt: skip
                image, source = _mask_image(mask, source_paths, mask_labels)
                try:
                    mask_array, mask_notes = mask_onto(image, reference)
                except ValueError as exc:  # radflow's own PHI-free reasons
                    raise ConversionError(str(exc)) from None
                mask_notes = {"mask_source": source, **mask_notes}
            case_fields = {
                "channels": [n for n in names if n],
                "n_channels": len(channels),
                "channels_resampled": [names[i] for i in resampled],
                "has_mask": mask_array is not None,
                **mask_notes,
            }
            unit, ref_sidecar = converted[0][1], converted[0][2]
            if single:  # the lone channel's own NIfTI stays as convert_unit wrote it
                if mask_array is not None:
                    from radflow.dicom.nifti import write_nifti

                    write_nifti(outputs[2], mask_array, affine, compression_level, threads)
                else:
                    outputs[2].unlink(missing_ok=True)
                _write_json(outputs[1], {**ref_sidecar, **case_fields})
                row.update({k: unit[k] for k in ("route", "ndim", "shape", "spacing_mm", "dtype")})
            else:
                routes = list(dict.fromkeys(u["route"] for _, u, _ in converted))
                sidecar = {k: v for k, v in ref_sidecar.items() if k in SIDECAR_WHITELIST}
                sidecar.update({
                    "series_pid": series_pid,
                    "n_files": sum(len(ch["paths"]) for ch in channels),
                    "radflow_version": radflow_version(),
                    "dcm2niix_version": dcm2niix_version(),
                    "route": "+".join(routes),
                    "ndim": ref_sidecar["ndim"],
                    "shape": ref_sidecar["shape"],
                    "spacing_mm": ref_sidecar["spacing_mm"],
                    "dtype": str(data.dtype),
                    **case_fields,
                    "channel_sidecars": {
                        name: {k: v for k, v in sc.items() if k != "series_pid"}
                        for name, (_, _, sc) in zip(names, converted, strict=True)
                    },
                })  # fmt: skip
                write_case(out, series_pid, data, affine, mask_array, dict(sorted(sidecar.items())),
                           compression_level=compression_level, threads=threads)  # fmt: skip
                row.update({"route": sidecar["route"], "ndim": sidecar["ndim"],
                            "shape": _fmt(sidecar["shape"]),
                            "spacing_mm": _fmt(sidecar["spacing_mm"]),
                            "dtype": sidecar["dtype"]})  # fmt: skip
        row[C.STATUS] = C.STATUS_OK
    except Exception as exc:  # one bad case must not stop the shard
        if isinstance(exc, ConversionError):
            reason = str(exc)
        else:
            paths = [p for ch in channels for p in ch["paths"]]
            roots = [os.path.realpath(dicom_root), os.path.abspath(dicom_root), str(dicom_root)]
            secrets = [*roots, *paths, *map(os.path.basename, paths)]
            if mask:
                secrets += [mask, os.path.dirname(mask), os.path.basename(mask)]
            reason = _UID.sub("<uid>", _short_error(exc, secrets))
        row.update({C.STATUS: C.STATUS_FAILED, C.REASON: reason})
        for stale in outputs:
            stale.unlink(missing_ok=True)
    return row


def _convert_case_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    return convert_case(**kwargs)


def case_jobs(table: pd.DataFrame, dicom_root: str, out_dir: str, **settings) -> list[dict]:
    """The `convert_case` keyword arguments of every case of a case shard table (rows
    of a case: its channels' files in channel order, then its mask)."""
    jobs = []
    for series_pid, group in table.groupby(C.SERIES_PID, sort=True):
        images = group[group[C.ROLE] == C.ROLE_IMAGE]
        channels = [
            {"name": name, "modality": files[C.MODALITY].iloc[0],
             "paths": sorted(files[C.PATH]), "keys": files[C.UNIT_KEYS].iloc[0]}
            for name, files in images.groupby(C.CHANNEL, sort=False)
        ]  # fmt: skip
        masks = group[group[C.ROLE] == C.ROLE_MASK]
        mask = masks.iloc[0] if len(masks) else {}
        labels = mask.get(C.MASK_LABELS, "") if len(masks) else ""
        jobs.append(dict(series_pid=series_pid, channels=channels, mask=mask.get(C.PATH, ""),
                         mask_channel=mask.get(C.CHANNEL, ""),
                         mask_labels=json.loads(labels) if labels else None,
                         dicom_root=dicom_root, out_dir=out_dir, **settings))  # fmt: skip
    return sorted(jobs, key=lambda job: -sum(len(ch["paths"]) for ch in job["channels"]))
