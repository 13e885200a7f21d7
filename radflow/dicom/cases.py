"""Multi-series DICOM cases at index time: image units grouped into cases, their channels
named, labels and ground-truth masks joined at case level.

A segmentation study sees one case per study (or per accession...), made of several
series: FLAIR and T1 post-contrast form one two-channel image. Config `data.case_key` (a
DICOM keyword constant within a series, e.g. StudyInstanceUID or AccessionNumber) groups
the index's image units into cases; `data.channels` (an ordered mapping channel name ->
regular expression, searched in the header value of `data.channel_keyword`, default
SeriesDescription) names each unit's channel. The reference channel
(`data.reference_channel`, else the first) gives the case its grid at conversion.

Per case (`index_cases`), with the reason in the quarantine table where it cannot be used
(a reason names channels, patterns and keywords, never an identifier or a description):
  - a unit whose identifiers are missing or not constant is excluded as a plain unit is;
  - a unit that matches no channel pattern is left out (REASON_NO_CHANNEL: a localizer,
    a DWI... the study does not use; listed, not an error);
  - a case is quarantined when a channel matches no unit, or several, when one unit
    matches several channels, or when its units belong to different patients;
  - labels (`labels_table` by `label_key`) join at case level: any unit's key value may
    carry the case's label, all that do must agree;
  - masks (`data.masks_table` by `data.masks_key`, default the case key) join at case
    level the same way; with a masks table every case needs exactly one mask ("no mask"
    otherwise: a segmentation study scores every case against its reference), readable
    as a label image (NIfTI, MetaImage, NRRD) or a DICOM SEG that references one of the
    case's series and is of the case's patient.

Without `case_key` but with a masks table each unit is its own one-channel case (a CT
series and its mask): nothing else changes. The case pseudonym is the unit id
downstream (`series_pid`): stages after convert see one unit per case. The private shard
table lists each case's files with their channel and role (image/mask), the reference
channel first, and the mask's content hash (a mask replaced under the same name then
reconverts its shard).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from radflow import conventions as C
from radflow.dicom.channels import CaseSettings
from radflow.dicom.headers import REASON_NO_LABEL, FileRecord
from radflow.dicom.units import ImageUnit, identity_problem

REASON_NO_CHANNEL = "matches no channel pattern (left out)"
REASON_MISSING_CHANNEL = "missing channel"
REASON_CHANNEL_TWICE = "channel matches several image units"
REASON_SEVERAL_CHANNELS = "image unit matches several channel patterns"
REASON_CASE_PATIENTS = "patient differs between the series of the case"
REASON_LABELS_DIFFER = "labels differ between the series of the case"
REASON_NO_MASK = "no mask in masks table"
REASON_MASK = "mask"  # prefix of every problem of a case's mask file ("mask: ...")
#: Reasons followed by case-specific details; the summary counts them by prefix.
_DETAILED = (REASON_MISSING_CHANNEL, REASON_CHANNEL_TWICE, REASON_SEVERAL_CHANNELS,
             REASON_CASE_PATIENTS)  # fmt: skip
#: Extra columns of a case shard table (after the unit shard table's).
CASE_SHARD_COLUMNS = [C.CHANNEL, C.ROLE, C.MASK_SHA256, C.MASK_LABELS]


@dataclass
class _Member:
    """An image unit of a case: its files (sorted by path) and its own pseudonym."""

    unit: ImageUnit
    files: list[FileRecord]
    pid: str
    channels: list[str] = field(default_factory=list)


@dataclass
class _Case:
    pid: str
    members: list[_Member] = field(default_factory=list)

    @property
    def files(self) -> list[FileRecord]:
        return [f for m in self.members for f in m.files]

    def values(self, keyword: str | None) -> set[str]:
        """Non-empty values of a header keyword over the case's files (None: the label
        key, read into FileRecord.label_value)."""
        found = {f.label_value if keyword is None else f.keys.get(keyword, "") for f in self.files}
        return found - {""}


def category(reason: str) -> str:
    """`reason` without case-specific details, for counting."""
    if reason.startswith(f"{REASON_MASK}: "):
        return reason.split(" (")[0]
    return next((p for p in _DETAILED if reason.startswith(p)), reason)


def _channel_problem(case: _Case, settings: CaseSettings) -> str:
    """Why a case's channels cannot form one image ("" if they can)."""
    several = next((m for m in case.members if len(m.channels) > 1), None)
    if several:
        return (f"{REASON_SEVERAL_CHANNELS}: {', '.join(several.channels)} (make the patterns "
                "of data.channels exclusive)")  # fmt: skip
    counts = Counter(m.channels[0] for m in case.members)
    for name in settings.names:
        if counts[name] == 0:
            return f"{REASON_MISSING_CHANNEL}: no image unit of the case matches {settings.describe(name)}"
        if counts[name] > 1:
            return (f"{REASON_CHANNEL_TWICE}: {counts[name]} match {settings.describe(name)}; "
                    "one is needed")  # fmt: skip
    return ""


def _case_label(case: _Case, labels: Mapping[str, int] | None) -> tuple[int, str]:
    """(label, reason): -1 without a labels table; the label any unit's key value has."""
    if labels is None:
        return -1, ""
    found = {labels[v] for v in case.values(None) if v in labels}
    if not found:
        return -1, REASON_NO_LABEL
    if len(found) > 1:
        return -1, REASON_LABELS_DIFFER
    return found.pop(), ""


def check_mask(path: str, channel_units: Sequence[tuple[str, _Member]], patient: str,
               patient_key: str) -> tuple[str, str]:  # fmt: skip
    """(source channel, reason) of a case's mask file, from its header: a label image
    (NIfTI, MetaImage, NRRD) has no source channel (""), a DICOM SEG the first channel
    whose series it references. `channel_units`: (channel, unit) in channel order."""
    from radflow.dicom.seg import read_seg_header
    from radflow.images import VOLUME_SUFFIXES, _short, read_info

    if not os.path.isfile(path):
        return "", f"{REASON_MASK}: file not found"
    if path.lower().endswith(VOLUME_SUFFIXES):
        try:
            info = read_info(path)
        except Exception as exc:  # one bad mask must not stop the index
            secrets = [path, os.path.dirname(path), os.path.basename(path)]
            return "", f"{REASON_MASK}: unreadable label image ({_short(exc, secrets)})"
        if info.components != 1:
            return (
                "",
                f"{REASON_MASK}: {info.components} components per voxel (a label map is needed)",
            )
        return "", ""
    try:
        header = read_seg_header(path, patient_key)
    except ValueError as exc:
        return "", f"{REASON_MASK}: {exc}"
    except Exception as exc:
        return "", f"{REASON_MASK}: unreadable DICOM ({type(exc).__name__})"
    if header is None:
        return "", (f"{REASON_MASK}: unsupported format (a NIfTI, MetaImage or NRRD label "
                    "image, or a DICOM SEG)")  # fmt: skip
    if header.patient and header.patient != patient:
        return "", f"{REASON_MASK}: the DICOM SEG is of another patient ({patient_key} differs)"
    for channel, member in channel_units:
        if member.files[0].series_uid in header.referenced_series:
            return channel, ""
    return "", f"{REASON_MASK}: the DICOM SEG references none of the case's series"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def _group(
    members: list[_Member], settings: CaseSettings, pseudo
) -> tuple[list[_Case], list[_Member]]:
    """Cases of the usable units, and the units that match no channel."""
    if settings.case_key is None:
        for m in members:
            m.channels = [""]
        return [_Case(m.pid, [m]) for m in members], []
    by_value: dict[str, list[_Member]] = defaultdict(list)
    unmatched = []
    for m in members:
        m.channels = settings.match(m.files[0].keys.get(settings.channel_keyword, ""))
        if m.channels:
            by_value[m.files[0].keys[settings.case_key]].append(m)
        else:
            unmatched.append(m)
    cases = [_Case(pseudo("ser", f"case/{settings.case_key}={value}"), found)
             for value, found in sorted(by_value.items())]  # fmt: skip
    return cases, unmatched


def index_cases(
    units: Sequence[ImageUnit],
    settings: CaseSettings,
    rows,
    *,
    labels: Mapping[str, int] | None,
    patient_key: str,
    masks: Mapping[str, str] | None,
    masks_key: str | None,
    mask_labels: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Group `units` into cases and add their rows to `rows` (the index's collector,
    `radflow.dicom.index._Rows`); returns the summary's case and mask counts.
    `mask_labels` ({SEG segment label: label value}) goes into the mask rows of the shard
    table, which are what convert reads: a changed mapping reconverts the shards."""
    pseudo = rows.pseudo
    labels_text = json.dumps(dict(mask_labels), sort_keys=True) if mask_labels else ""
    usable = []
    required = (settings.case_key,) if settings.case_key else ()
    for unit in units:
        files = sorted(unit.files, key=lambda f: f.path)
        pid = pseudo("ser", unit.unit_id)
        for f in files:
            rows.unit_of_sop.setdefault(f.sop_uid, pid)
        reason = unit.problem or identity_problem(
            files, patient_key, required=required, constant=settings.keywords
        )
        if reason:
            rows.exclude(pid, files, reason)
        else:
            usable.append(_Member(unit, files, pid))
    cases, unmatched = _group(usable, settings, pseudo)
    for m in unmatched:
        rows.exclude(m.pid, m.files, REASON_NO_CHANNEL)

    rows_of: dict[str, list[str]] = {}  # the masks table's key values each case matches
    if masks is not None:
        for case in cases:
            rows_of[case.pid] = sorted(v for v in case.values(masks_key) if v in masks)
    claims = Counter(v for found in rows_of.values() for v in found)
    kept_with_mask = 0
    for case in cases:
        by_channel = {m.channels[0]: m for m in case.members}
        reason = _channel_problem(case, settings)
        patients = {f.patient for f in case.files}
        if not reason and len(patients) > 1:
            reason = f"{REASON_CASE_PATIENTS} ({patient_key})"
        label, label_problem = _case_label(case, labels)
        reason = reason or label_problem
        mask, source = "", ""
        if not reason and masks is not None:
            found = rows_of[case.pid]
            if not found:
                reason = REASON_NO_MASK
            elif len({masks[v] for v in found}) > 1:
                reason = f"{REASON_MASK}: several masks for the case ({len(found)} rows of the masks table match)"
            elif max(claims[v] for v in found) > 1:
                reason = (f"{REASON_MASK}: a masks table row matches several cases "
                          f"({max(claims[v] for v in found)}; {masks_key} is not specific "
                          "to one case)")  # fmt: skip
            else:
                mask = masks[found[0]]
                channel_units = [(name, by_channel[name]) for name in settings.names]
                source, reason = check_mask(mask, channel_units, patients.pop(), patient_key)
        if reason:
            rows.exclude(case.pid, case.files, reason, category(reason))
            continue
        reference = by_channel[settings.names[0]]
        first = reference.files[0]
        shard = C.shard_of(case.pid, rows.n_shards)
        row = rows.series_row(case.pid, first, label, shard, len(case.files))
        row["channels"] = " ".join(n for n in settings.names if n)
        rows.series.append(row)
        for name in settings.names:
            m = by_channel[name]
            rows.shards[shard].extend(
                (case.pid, first.modality, f.path, m.unit.frames.get(f.path, ""), m.unit.keys,
                 name, C.ROLE_IMAGE, "", "")
                for f in m.files
            )  # fmt: skip
        if mask:
            kept_with_mask += 1
            rows.shards[shard].append((case.pid, first.modality, mask, "", "", source, C.ROLE_MASK,
                                       file_sha256(mask), labels_text))  # fmt: skip
        rows.label_keys_used.update(case.values(None) & set(labels or ()))
        for value in case.values(None):
            rows.patients_of_key[value].add(row[C.PATIENT_PID])
    summary: dict[str, Any] = {
        "case_key": settings.case_key,
        "channel_keyword": settings.channel_keyword if settings.case_key else None,
        "n_cases_found": len(cases),
        "n_units_not_a_channel": len(unmatched),
    }
    if masks is not None:
        found_keys = {f.keys.get(masks_key, "") for unit in units for f in unit.files}
        summary["masks"] = {
            "n_rows": len(masks),
            "unmatched": len(set(masks) - found_keys),
            "kept_cases_with_mask": kept_with_mask,
            "masks_key": masks_key,
        }
    return summary
