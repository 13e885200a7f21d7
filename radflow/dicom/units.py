"""Group the image files of a DICOM series into image units: what becomes one NIfTI image.

Projection series (`conventions.PROJECTION_MODALITIES`: DX, CR, MG...) hold unrelated
views: each instance is a unit ("<SeriesInstanceUID>/<SOPInstanceUID>", or the series
uid alone for a one-image series).

Cross-sectional series (CT, MR, PT...) are converted by dcm2niix, so a unit is what
dcm2niix writes as one image, found from the headers alone (`group_series`):
  1. The series is (SeriesInstanceUID, SeriesNumber): dcm2niix never stacks different
     series numbers (vendors re-save one series under new numbers).
  2. Localizers (ImageType LOCALIZER) and slices in a minority orientation are left out
     with a reason (dcm2niix writes them as extra "_i0000N" images nobody trains on).
  3. The rest is split where dcm2niix refuses to stack: image size, echo number, echo
     time and complex part (magnitude/phase/real/imaginary), and a Philips isotropic
     diffusion trace is separated from its series (dcm2niix's "_ADC" file). Unit ids are
     "<uid>/<key>=<value>/..." with the keys that vary (`headers.UNIT_KEYS`, "size",
     "trace"); the shard table carries the keys so convert can pick the matching output
     of dcm2niix when one file holds several units' frames.
  4. Everything else that varies (time points, b-values, acquisitions, trigger delays,
     repeated positions) stays in one unit: dcm2niix's 4D image, volumes in its order.
Multi-frame files take part frame by frame; a file whose frames fall in several units is
listed with its frames (`conventions.FRAMES`) in each.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from radflow import conventions as C
from radflow.dicom.headers import ORIENTATION_TOLERANCE, FileRecord, SliceKey

REASON_LOCALIZER = "localizer excluded from its series (ImageType LOCALIZER)"
REASON_OFF_STACK = "orientation differs from the series' main stack (localizer or scout): excluded"

#: dcm2niix's file-name token for a unit key value: echo 2 -> "e2", phase -> "ph".
_PART_TOKENS = {"M": "", "P": "ph", "R": "real", "I": "imaginary"}


@dataclass
class ImageUnit:
    """One future NIfTI image: its identifier (hashed into series_pid), files, the frames
    of each multi-frame file that belong to it (path -> `conventions.FRAMES` text, absent
    = all), the keys that split its series ("echo=2/part=P"; "" if not split) and why it
    cannot be used ("" if it can)."""

    unit_id: str
    files: list[FileRecord]
    frames: dict[str, str] = field(default_factory=dict)
    split_by: str = ""
    problem: str = ""
    keys: str = ""  # "echo=2/part=P": the split keys' values ("" if not split)


def dcm2niix_tokens(keys: str) -> set[str]:
    """The suffix tokens dcm2niix gives the image of a unit with these keys, e.g.
    "echo=2/part=P" -> {"e2", "ph"} (magnitude and a lone echo get none)."""
    tokens = set()
    for item in filter(None, keys.split("/")):
        name, _, value = item.partition("=")
        if name == "echo":
            tokens.add(f"e{value}")
        elif name == "part" and _PART_TOKENS.get(value):
            tokens.add(_PART_TOKENS[value])
        elif name == "echo_rank":  # echoes told apart by echo time only: dcm2niix counts them
            tokens.add(f"e{value}")
        elif name == "trace" and value == "isotropic":
            tokens.add("ADC")
    return tokens


def _as_number(text: str) -> tuple[float, str]:
    try:
        return float(text), text
    except ValueError:
        return float("inf"), text


#: In-plane position error beyond which a stack is not one straight or tilted stack (mm);
#: positions are written to ~0.001 mm, real misplacements are whole millimetres.
IN_PLANE_TOLERANCE_MM = 0.05


def _shift_problem(slices: Sequence[SliceKey]) -> str:
    """Why a stack cannot become one image ("" if it can): slices shifted in-plane other
    than in proportion to their distance along the normal (a gantry tilt is such a
    proportion, which dcm2niix corrects). dcm2niix resamples such a stack as if only its
    spacing were uneven, placing the shifted slices wrongly, so radflow refuses it."""
    if len(slices) < 3 or any(s.position is None or s.orientation is None for s in slices):
        return ""
    orientation = np.array(slices[0].orientation)
    if any(np.abs(np.subtract(s.orientation, orientation)).max() >= ORIENTATION_TOLERANCE
           for s in slices):  # fmt: skip
        return ""
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal) or 1.0
    offsets = np.array([s.position for s in slices]) - slices[0].position
    along = offsets @ normal
    in_plane = offsets - np.outer(along, normal)
    if not np.any(along):
        return ""
    shear = (along @ in_plane) / (along @ along)  # the tilt that fits best
    residual = float(np.linalg.norm(in_plane - np.outer(along, shear), axis=1).max())
    if residual > IN_PLANE_TOLERANCE_MM:
        return (f"slices shifted in-plane irregularly along the stack (up to {residual:.2g} mm, "
                "not a gantry tilt): positions contradict one image")  # fmt: skip
    return ""


def group_projection(series_uid: str, files: Sequence[FileRecord]) -> list[ImageUnit]:
    """One unit per instance of a projection series (the uid alone for one image)."""
    if len(files) == 1:
        return [ImageUnit(series_uid, list(files))]
    return [ImageUnit(f"{series_uid}/{f.sop_uid}", [f]) for f in files]


def group_series(
    series_uid: str, files: Sequence[FileRecord]
) -> tuple[list[ImageUnit], list[tuple[FileRecord, str]]]:
    """The image units of one cross-sectional series (files of one SeriesInstanceUID),
    and the (file, reason) pairs left out; see the module docstring for the rules."""
    by_number: dict[str, list[FileRecord]] = defaultdict(list)
    for rec in files:
        by_number[rec.series_number].append(rec)
    units: list[ImageUnit] = []
    left_out: list[tuple[FileRecord, str]] = []
    for number, members in sorted(by_number.items()):
        uid = series_uid if len(by_number) == 1 else f"{series_uid}/number={number}"
        found, lost = _group_slices(uid, members)
        units += found
        left_out += lost
    return units, left_out


def _group_slices(
    series_uid: str, files: Sequence[FileRecord]
) -> tuple[list[ImageUnit], list[tuple[FileRecord, str]]]:
    slices = [(rec, sk) for rec in files for sk in rec.slices]
    left_out: dict[str, list[tuple[FileRecord, SliceKey, str]]] = defaultdict(list)
    keep = []
    for rec, sk in slices:
        if "LOCALIZER" in rec.image_type.split("\\"):
            left_out[rec.path].append((rec, sk, REASON_LOCALIZER))
        else:
            keep.append((rec, sk))
    if not keep:
        return [ImageUnit(series_uid, list(files), problem="localizer series (every image "
                          "has ImageType LOCALIZER)")], []  # fmt: skip
    if all(sk.orientation is not None for _, sk in keep):
        groups: list[list[tuple[FileRecord, SliceKey]]] = []
        for item in keep:
            for group in groups:
                if np.abs(np.subtract(group[0][1].orientation, item[1].orientation)).max() < (
                    ORIENTATION_TOLERANCE
                ):
                    group.append(item)
                    break
            else:
                groups.append([item])
        main = max(groups, key=len)
        if len(groups) > 1 and 2 * len(main) > len(keep):
            for group in groups:
                if group is not main:
                    for rec, sk in group:
                        left_out[rec.path].append((rec, sk, REASON_OFF_STACK))
            keep = main
        # several orientations and none in the majority: one unit, dcm2niix decides

    def values(rec: FileRecord, sk: SliceKey) -> dict[str, str]:
        out = dict(sk.keys)
        out["size"] = f"{rec.rows}x{rec.columns}x{rec.bits_allocated}"
        if rec.trace:
            out["trace"] = "isotropic"
        return out

    names = ["size", "echo", "te", "part", "trace"]
    used = [n for n in names if len({values(r, s).get(n, "") for r, s in keep}) > 1]
    stacks: dict[tuple[str, ...], list[tuple[FileRecord, SliceKey]]] = defaultdict(list)
    for rec, sk in keep:
        found = values(rec, sk)
        stacks[tuple(found.get(n, "") for n in used)].append((rec, sk))
    # echoes with an echo time but no echo number (enhanced files): dcm2niix numbers them
    # in order of echo time ("_e1", "_e2"); the rank goes into the keys, not the unit id
    te_rank: dict[str, int] = {}
    if "te" in used and "echo" not in used:
        te_values = sorted({v[used.index("te")] for v in stacks}, key=_as_number)
        te_rank = {te: rank for rank, te in enumerate(te_values, start=1)}
    units = []
    for key_values, members in sorted(stacks.items()):
        keys = "/".join(f"{n}={v}" for n, v in zip(used, key_values, strict=True))
        unit_id = f"{series_uid}/{keys}" if keys else series_uid
        if te_rank:
            keys += f"/echo_rank={te_rank[key_values[used.index('te')]]}"
        by_file: dict[str, list[int | None]] = defaultdict(list)
        records: dict[str, FileRecord] = {}
        for rec, sk in members:
            by_file[rec.path].append(sk.frame)
            records[rec.path] = rec
        frames = {}
        for path, indices in by_file.items():
            rec = records[path]
            if rec.n_frames > 1 and None not in indices and len(indices) < rec.n_frames:
                frames[path] = " ".join(str(i) for i in sorted(indices))
        units.append(ImageUnit(unit_id, list(records.values()), frames, "/".join(used),
                               _shift_problem([sk for _, sk in members]), keys))  # fmt: skip
    rows = []
    for _path, items in sorted(left_out.items()):
        rec, reason = items[0][0], items[0][2]
        if rec.n_frames > 1 and items[0][1].frame is not None:
            reason = f"{reason} ({len(items)} of {rec.n_frames} frames)"
        rows.append((rec, reason))
    return units, rows


def identity_problem(
    files: Sequence[FileRecord],
    patient_key: str,
    label_key: str | None = None,
    *,
    required: Sequence[str] = (),
    constant: Sequence[str] = (),
) -> str:
    """Why a unit cannot be used ("" if it can): its patient (and label key, when given)
    missing or not constant over its files; likewise the header keywords in `required`
    (read into FileRecord.keys); those in `constant` may be empty but not differ."""
    patients = {f.patient for f in files}
    if "" in patients:
        return f"missing {patient_key} (a patient-level split cannot be guaranteed)"
    if len(patients) > 1:
        return f"{patient_key} differs between files of the unit"
    if len({f.study_uid for f in files}) > 1:
        return "StudyInstanceUID differs between files of the unit"
    if label_key is not None:
        label_values = {f.label_value for f in files}
        if len(label_values) > 1:
            return f"{label_key} differs between files of the unit"
        if "" in label_values:
            return f"no {label_key} in the DICOM header"
    for keyword in dict.fromkeys((*required, *constant)):
        values = {f.keys.get(keyword, "") for f in files}
        if len(values) > 1:
            return f"{keyword} differs between files of the unit"
        if keyword in required and values == {""}:
            return f"no {keyword} in the DICOM header"
    return ""


def group_units(
    by_series: dict[str, list[FileRecord]],
) -> tuple[list[ImageUnit], list[tuple[FileRecord, str]]]:
    """Every series' units (projection or cross-sectional) and the files left out."""
    units: list[ImageUnit] = []
    left_out: list[tuple[FileRecord, str]] = []
    for series_uid, files in by_series.items():
        modalities = {f.modality for f in files}
        if len(modalities) > 1:
            problem = "Modality differs between files of the series"
            units.append(ImageUnit(series_uid, files, problem=problem))
        elif modalities.pop() in C.PROJECTION_MODALITIES:
            units.extend(group_projection(series_uid, files))
        else:
            found, lost = group_series(series_uid, files)
            units.extend(found)
            left_out.extend(lost)
    return units, left_out
