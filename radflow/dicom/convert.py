"""Convert the image units of one shard from DICOM to NIfTI-1 (.nii.gz + JSON sidecar).

Two routes, chosen per unit (`choose_route`; the README's table says why) and written in
the sidecar with the reason:
- **dcm2niix** (`radflow.dicom.engine`) for every cross-sectional unit. Its voxel bytes,
  data type, scl_slope/scl_inter and affine are kept bit for bit; only what may carry PHI
  is replaced (descrip holds the acquisition time, aux_file ImageComments; intent_name,
  db_name, extensions); its sidecar is never copied, only `ENGINE_SIDECAR_FIELDS`;
  .bval/.bvec are copied. 4D units keep dcm2niix's (x, y, z, volume) layout and order.
- **radflow** (`radflow.dicom.reader`) where dcm2niix is wrong or unable: radiographs,
  MONOCHROME1, Modality LUT, deflate, signed 8-bit, 12-bit JPEG, lossless JPEG predictor
  other than 1, J2K signedness contradicting the header, files without preamble. It reads
  single images and regular stacks only; a unit needing more fails with both reasons.
Outputs are written atomically; a failed unit removes its stale outputs and is listed with
its reason in the manifest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.encaps import generate_fragments
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
)

from radflow import conventions as C
from radflow.deid import SIDECAR_WHITELIST, quiet_pydicom, sidecar_fields
from radflow.dicom import radflow_version
from radflow.dicom.engine import (
    EngineError,
    dcm2niix_version,
    engine_temp_dir,
    pick_output,
    run_dcm2niix,
)
from radflow.dicom.index import read_shard_files
from radflow.dicom.nifti import VOX_OFFSET, write_nifti, write_nifti_stream
from radflow.dicom.reader import (
    ConversionError,
    build_volume,
    grayscale_photometric,
    load_slices,
    projection_geometry,
    stack_geometry,
)
from radflow.dicom.syntax import transfer_syntax
from radflow.dicom.units import dcm2niix_tokens
from radflow.tables import write_bytes_atomic, write_tsv

ROUTE_DCM2NIIX = "dcm2niix"
ROUTE_RADFLOW = "radflow"
MANIFEST_COLUMNS = [C.SERIES_PID, C.STATUS, C.REASON, "route", "ndim", "shape", "spacing_mm",
                    "dtype"]  # fmt: skip

#: Fields of dcm2niix's BIDS sidecar that radflow's sidecar keeps (acquisition
#: parameters; never names, dates, times, UIDs, free text, institution or device ids).
ENGINE_SIDECAR_FIELDS = (
    "EchoTime", "EchoNumber", "RepetitionTime", "InversionTime", "FlipAngle",
    "SliceTiming", "SliceThickness", "SpacingBetweenSlices", "MagneticFieldStrength",
    "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "PhaseEncodingDirection",
    "PhaseEncodingAxis", "EffectiveEchoSpacing", "TotalReadoutTime",
    "EstimatedEffectiveEchoSpacing", "EstimatedTotalReadoutTime", "PixelBandwidth",
    "MultibandAccelerationFactor", "ParallelReductionFactorInPlane", "PartialFourier",
    "AcquisitionMatrixPE", "ReconMatrixPE", "PercentPhaseFOV", "ImageType",
    "ImageOrientationPatientDICOM", "ConversionSoftwareVersion",
)  # fmt: skip


def _first_codestream(ds: pydicom.Dataset) -> bytes | None:
    """The first fragment of encapsulated pixel data that holds a codestream (the Basic
    Offset Table item, possibly empty, comes first and is skipped)."""
    try:
        for fragment in generate_fragments(ds.PixelData):
            if fragment[:2] == b"\xff\xd8" or fragment[:2] == b"\xff\x4f":  # JPEG, J2K
                return fragment
    except (AttributeError, ValueError, TypeError):
        return None
    return None


def _jpeg_lossless_predictor(ds: pydicom.Dataset) -> int | None:
    """The predictor (selection value, 1-7) of a process-14 lossless JPEG codestream,
    read from its start-of-scan marker; None if not found."""
    stream = _first_codestream(ds)
    start = stream.find(b"\xff\xda") if stream else -1
    if start < 0 or start + 5 > len(stream):
        return None
    at = start + 5 + 2 * stream[start + 4]  # Ss follows the component selectors
    return stream[at] if at < len(stream) else None


def _j2k_signed(ds: pydicom.Dataset) -> bool | None:
    """Whether a JPEG 2000 codestream says its first component is signed (SIZ marker)."""
    stream = _first_codestream(ds)
    start = stream.find(b"\xff\x51") if stream else -1
    at = start + 40  # marker, Lsiz, Rsiz, 8 x 32-bit sizes, Csiz, then Ssiz of component 0
    return bool(stream[at] & 0x80) if start >= 0 and at < len(stream) else None


def choose_route(modality: str, ds: pydicom.Dataset) -> tuple[str, str]:
    """(route, reason) for a unit whose first file has header `ds` (read without pixel
    data; the file is read whole only for 16-bit lossless JPEG and JPEG 2000, whose
    codestream headers decide)."""
    if modality in C.PROJECTION_MODALITIES:
        return ROUTE_RADFLOW, (
            "projection radiograph: dcm2niix ignores ImagerPixelSpacing and does not "
            "invert MONOCHROME1"
        )
    syntax = transfer_syntax(ds)
    if syntax == DeflatedExplicitVRLittleEndian:
        return ROUTE_RADFLOW, "deflated transfer syntax: dcm2niix cannot read it"
    bits = int(ds.get("BitsAllocated") or 0)
    if bits == 8 and int(ds.get("PixelRepresentation") or 0) == 1:
        return ROUTE_RADFLOW, "signed 8-bit pixels: dcm2niix reads them as unsigned"
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        return ROUTE_RADFLOW, "MONOCHROME1: dcm2niix does not invert it"
    if "ModalityLUTSequence" in ds:
        return ROUTE_RADFLOW, "Modality LUT: dcm2niix ignores it"
    if syntax == JPEGExtended12Bit and bits > 8:
        return ROUTE_RADFLOW, "12-bit JPEG extended: dcm2niix cannot decode it"
    preamble = _preamble_problem(ds)
    if preamble:
        return ROUTE_RADFLOW, f"{preamble}: dcm2niix does not read such files"
    if (syntax == JPEGLossless and bits == 16) or syntax in (JPEG2000, JPEG2000Lossless):
        if "PixelData" not in ds and getattr(ds, "filename", None):
            ds = pydicom.dcmread(ds.filename, force=True)
        predictor = _jpeg_lossless_predictor(ds) if syntax == JPEGLossless else None
        if predictor not in (None, 1):
            return ROUTE_RADFLOW, (
                f"16-bit lossless JPEG with predictor {predictor}: dcm2niix decodes it wrongly"
            )
        signed = _j2k_signed(ds) if syntax != JPEGLossless else None
        if signed is not None and signed != (int(ds.get("PixelRepresentation") or 0) == 1):
            return ROUTE_RADFLOW, (
                "JPEG 2000 codestream signedness contradicts PixelRepresentation: dcm2niix "
                "follows the codestream, radflow the header"
            )
    return ROUTE_DCM2NIIX, "cross-sectional series: dcm2niix is the conversion engine"


def _preamble_problem(ds: pydicom.Dataset) -> str:
    """Why dcm2niix would not find this file ("" if it will): it needs the 128-byte
    preamble and "DICM", or else a raw implicit little endian dataset."""
    path = getattr(ds, "filename", None)
    if not isinstance(path, str):
        return ""
    with open(path, "rb") as fh:
        if fh.read(132)[128:] == b"DICM":
            return ""
    if getattr(ds, "file_meta", None) and "TransferSyntaxUID" in ds.file_meta:
        return "file meta without the 128-byte preamble"
    if transfer_syntax(ds) != ImplicitVRLittleEndian:
        return "raw dataset (no preamble) in explicit VR or big endian"
    return ""


def _short_error(exc: BaseException, secrets: Sequence[str]) -> str:
    """Type and first message line of an unexpected error, with paths removed."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    for text in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(text, "<file>")
    return (f"{type(exc).__name__}: {message}" if message else type(exc).__name__)[:160]


def _fmt(values: Sequence[float]) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())


def _clean_header(header: nib.Nifti1Header) -> bytes:
    """dcm2niix's header with the free-text fields replaced, no extensions, voxels at 352."""
    header = header.copy()
    header["descrip"] = f"radflow {radflow_version()}"[:79].encode()
    for name in ("aux_file", "intent_name", "db_name"):
        header[name] = b""
    header.set_data_offset(VOX_OFFSET)
    return header.binaryblock + b"\x00" * (VOX_OFFSET - len(header.binaryblock))


def _stream(path: Path, offset: int, nbytes: int, chunk: int = 1 << 22):
    with open(path, "rb") as fh:
        fh.seek(offset)
        while nbytes > 0:
            data = fh.read(min(chunk, nbytes))
            if not data:
                raise ConversionError("dcm2niix's NIfTI is shorter than its header says")
            nbytes -= len(data)
            yield data


def _convert_dcm2niix(
    paths: Sequence[str], keys: str, out: Path, series_pid: str, *, uneven_spacing: str,
    gantry_tilt: str, compression_level: int, threads: int,
) -> dict[str, Any]:  # fmt: skip
    """Run dcm2niix on the unit, write radflow's NIfTI, sidecar extras and .bval/.bvec;
    returns what the sidecar and manifest need."""
    with engine_temp_dir() as work:
        try:
            outputs, _log = run_dcm2niix(paths, work)
            chosen = pick_output(outputs, dcm2niix_tokens(keys), uneven_spacing=uneven_spacing,
                                 gantry_tilt=gantry_tilt)  # fmt: skip
        except EngineError as exc:
            raise ConversionError(str(exc)) from exc
        # the header as on disk: a loaded image's header has scl_slope/inter and vox_offset
        # reset by nibabel (they move to the data proxy)
        with open(chosen.nii, "rb") as fh:
            header = nib.Nifti1Header.from_fileobj(fh)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        nbytes = int(np.prod(shape)) * dtype.itemsize
        offset = int(header["vox_offset"])
        if offset < VOX_OFFSET or offset + nbytes != chosen.nii.stat().st_size:
            raise ConversionError(
                "dcm2niix's NIfTI does not hold exactly the voxels its header describes"
            )
        write_nifti_stream(
            out / f"{series_pid}{C.NIFTI_SUFFIX}",
            _clean_header(header),
            _stream(chosen.nii, offset, nbytes),
            compression_level,
            threads,
        )
        extras: dict[str, Any] = {}
        if chosen.json is not None:
            engine = json.loads(chosen.json.read_text(errors="replace"))
            extras = {k: engine[k] for k in ENGINE_SIDECAR_FIELDS if k in engine}
        for attr, suffix in (("bval", ".bval"), ("bvec", ".bvec")):
            source = getattr(chosen, attr)
            if source is not None:
                write_bytes_atomic(out / f"{series_pid}{suffix}", source.read_bytes())
        if chosen.bval is not None:
            extras["bvals"] = [float(v) for v in chosen.bval.read_text().split()]
        if chosen.bvec is not None:
            extras["bvecs"] = [[float(v) for v in line.split()]
                               for line in chosen.bvec.read_text().splitlines() if line.strip()]  # fmt: skip
        zooms = tuple(round(float(z), 6) for z in header.get_zooms())
    return {
        "shape": shape,
        "spacing": zooms[:3],
        "dtype": str(dtype),
        "notes": {
            "dcm2niix_version": dcm2niix_version(),
            "dcm2niix": extras,
            "dcm2niix_suffix": "_".join(chosen.tokens),
            **chosen.notes,
        },  # fmt: skip
    }


def _convert_radflow(
    datasets: Sequence[pydicom.Dataset], projection: bool, out: Path, series_pid: str, *,
    compression_level: int, threads: int,
) -> dict[str, Any]:  # fmt: skip
    if projection and len(datasets) != 1:
        raise ConversionError(f"projection unit with {len(datasets)} slices (expected 1)")
    geometry = projection_geometry(datasets[0]) if projection else stack_geometry(datasets)
    ordered = [datasets[i] for i in geometry.order]
    volume, notes = build_volume(ordered)
    write_nifti(out / f"{series_pid}{C.NIFTI_SUFFIX}", volume, geometry.affine,
                compression_level, threads)  # fmt: skip
    shape = (volume.shape[2], volume.shape[1], volume.shape[0])
    if volume.shape[0] == 1:
        shape = shape[:2] + (1,)
    return {"shape": shape, "spacing": geometry.spacing, "dtype": str(volume.dtype),
            "notes": {**geometry.notes, **notes}}  # fmt: skip


def convert_unit(
    series_pid: str,
    modality: str,
    paths: Sequence[str],
    dicom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    compression_level: int = 6,
    keys: str = "",
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
    threads: int = 1,
) -> dict[str, Any]:
    """Convert one image unit; never raises for a bad unit.

    Inputs: the unit's pseudonym and modality, its files (relative to `dicom_root`), its
    keys ("echo=2/part=P", `conventions.UNIT_KEYS`), `uneven_spacing` / `gantry_tilt`
    (config convert.*), `threads` to compress the NIfTI (the bytes do not depend on them).
    Outputs: `<out_dir>/<series_pid>.nii.gz` and `.json` (and `.bval`/`.bvec` for
    diffusion), written atomically; stale ones removed if the unit fails. Returns its
    manifest row (MANIFEST_COLUMNS); ndim is 2 (one slice), 3, or 4 (a 4D image).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / f"{series_pid}{s}" for s in (C.NIFTI_SUFFIX, C.SIDECAR_SUFFIX, ".bval",
                                                  ".bvec")]  # fmt: skip
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row[C.SERIES_PID] = series_pid
    absolute = [os.path.join(dicom_root, p) for p in paths]
    try:
        with quiet_pydicom():
            header = load_header(absolute[0])
            grayscale_photometric(header)  # colour is refused on either route
            route, why = choose_route(modality, header)
            row["route"] = route
            if route == ROUTE_DCM2NIIX:
                done = _convert_dcm2niix(
                    absolute, keys, out, series_pid, uneven_spacing=uneven_spacing,
                    gantry_tilt=gantry_tilt, compression_level=compression_level,
                    threads=threads,
                )  # fmt: skip
            else:
                image_type = str(header.get("ImageType", "")).upper()
                if "MOSAIC" in image_type:
                    raise ConversionError(f"Siemens MOSAIC needs dcm2niix to unpack it, but {why}")
                try:
                    done = _convert_radflow(
                        load_slices(absolute), modality in C.PROJECTION_MODALITIES, out,
                        series_pid, compression_level=compression_level, threads=threads,
                    )  # fmt: skip
                except ConversionError as exc:
                    if modality in C.PROJECTION_MODALITIES:
                        raise
                    raise ConversionError(f"{exc}; dcm2niix cannot be used: {why}") from exc
        shape = done["shape"]
        ndim = 2 if len(shape) == 3 and shape[2] == 1 else min(len(shape), 4)
        if ndim == 4 and shape[3] == 1:
            ndim, shape = 3, shape[:3]
        sidecar = sidecar_fields(header)
        sidecar.update(
            {
                "series_pid": series_pid,
                "n_files": len(paths),
                "radflow_version": radflow_version(),
                "dcm2niix_version": dcm2niix_version(),  # the engine, or what routing judged
                "route": route,
                "route_reason": why,
                "ndim": ndim,
                "shape": list(shape),
                "spacing_mm": [round(float(v), 6) for v in done["spacing"]],
                "dtype": done["dtype"],
                **done["notes"],
            }
        )
        _write_json(outputs[1], sidecar)
        row.update({C.STATUS: C.STATUS_OK, "ndim": ndim, "shape": _fmt(shape),
                    "spacing_mm": _fmt(done["spacing"]), "dtype": done["dtype"]})  # fmt: skip
    except Exception as exc:  # one bad unit must not stop the shard
        if isinstance(exc, ConversionError):
            reason = str(exc)
        else:
            roots = [os.path.realpath(dicom_root), os.path.abspath(dicom_root), str(dicom_root)]
            reason = _short_error(exc, [*roots, *paths, *map(os.path.basename, paths)])
        row.update({C.STATUS: C.STATUS_FAILED, C.REASON: reason})
        for stale in outputs:
            stale.unlink(missing_ok=True)
    return row


#: What routing and the sidecar read of a unit's first file (enhanced files hold thousands
#: of functional-group elements that neither needs).
_HEADER_TAGS = (*SIDECAR_WHITELIST, "BitsAllocated", "PixelRepresentation",
                "PhotometricInterpretation", "ModalityLUTSequence", "ImageType")  # fmt: skip


def load_header(path: str) -> pydicom.Dataset:
    """A unit's first file's header: the elements routing and the sidecar read
    (`_HEADER_TAGS`)."""
    return pydicom.dcmread(path, force=True, stop_before_pixels=True,
                           specific_tags=list(_HEADER_TAGS))  # fmt: skip


def plan_workers(n_units: int, threads: int) -> tuple[int, int]:
    """How a shard uses `threads` cores: (processes, compression threads per unit).

    Many units run in parallel processes with one thread each; fewer units than threads
    share the threads out (one big unit compresses with all of them), so at most `threads`
    threads ever compress at once.
    """
    threads = max(1, int(threads))
    processes = max(1, min(threads, n_units))
    return processes, max(1, threads // processes)


def _convert_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    return convert_unit(**kwargs)


def run_jobs(
    fn, jobs: list[dict[str, Any]], processes: int, columns: list[str], *, unit: str,
    progress: bool = True, failed: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Manifest rows of `fn(job)` for every job (each has a "series_pid"), in `processes`
    worker processes, with a progress bar. A worker that dies (e.g. killed for memory)
    gives a failed row with the reason instead of stopping the shard; `failed` adds
    fields to such rows. Used by both converters (DICOM units, images-table cases)."""
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(jobs), desc="convert", unit=unit, file=sys.stderr, mininterval=2,
              disable=not progress) as bar:  # fmt: skip
        if processes == 1:
            for job in jobs:
                rows.append(fn(job))
                bar.update(1)
            return rows
        with ProcessPoolExecutor(max_workers=processes) as pool:
            futures = {pool.submit(fn, job): job for job in jobs}
            for future in as_completed(futures):
                try:
                    rows.append(future.result())
                except Exception as exc:
                    row = dict.fromkeys(columns, "")
                    row.update({C.SERIES_PID: futures[future]["series_pid"],
                                C.STATUS: C.STATUS_FAILED, **(failed or {}),
                                C.REASON: f"worker process failed ({type(exc).__name__})"})  # fmt: skip
                    rows.append(row)
                bar.update(1)
    return rows


def convert_shard(
    shard_files_tsv: str | os.PathLike,
    dicom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threads: int = 1,
    compression_level: int = 6,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
    progress: bool = True,
) -> pd.DataFrame:
    """Convert every unit listed in a private shard table (series_pid, modality, path,
    frames, unit_keys; see `radflow.dicom.index.read_shard_files`), or every case of a
    case shard table (with channel, role, mask_sha256, mask_labels:
    `radflow.dicom.case_convert`).

    Outputs in `out_dir`: per converted unit `<series_pid>.nii.gz` + `.json` (+ `.bval`,
    `.bvec`; a case: its channels on the 4th axis, + `_mask.nii.gz`), and `manifest.tsv`
    (MANIFEST_COLUMNS: series_pid, status ok/failed, reason, route dcm2niix/radflow,
    ndim 2/3/4, shape x\\y\\z[\\t] as stored, spacing_mm x\\y\\z, dtype), one row per unit
    sorted by series_pid. `threads` cores are used as `plan_workers` says (units with the
    most files start first); a failed unit is listed with its reason and the others still
    convert. The files do not depend on `threads`. Returns the manifest.
    """
    table = read_shard_files(shard_files_tsv)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(compression_level=compression_level, uneven_spacing=uneven_spacing,
                    gantry_tilt=gantry_tilt)  # fmt: skip
    if C.ROLE in table.columns:
        from radflow.dicom.case_convert import _convert_case_job, case_jobs

        fn, unit = _convert_case_job, "case"
        jobs = case_jobs(table, str(dicom_root), str(out), **settings)
    else:
        groups = sorted(table.groupby(C.SERIES_PID, sort=True), key=lambda g: -len(g[1]))
        fn, unit = _convert_job, "unit"
        jobs = [
            dict(series_pid=series_pid, modality=group[C.MODALITY].iloc[0],
                 paths=sorted(group[C.PATH]), dicom_root=str(dicom_root), out_dir=str(out),
                 keys=group[C.UNIT_KEYS].iloc[0], **settings)
            for series_pid, group in groups
        ]  # fmt: skip
    processes, unit_threads = plan_workers(len(jobs), threads)
    for job in jobs:
        job["threads"] = unit_threads
    rows = run_jobs(fn, jobs, processes, MANIFEST_COLUMNS, unit=unit, progress=progress)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values(C.SERIES_PID, kind="stable").reset_index(drop=True)
    write_tsv(manifest, out / C.MANIFEST)
    return manifest
