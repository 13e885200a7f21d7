"""LIDC-IDRI readers' XML to LUNA16-form nodule annotations (world mm, LPS).

An LIDC-IDRI scan comes with one XML file ("LidcReadMessage", namespace
http://www.nih.gov) holding up to four reading sessions, one per radiologist. Each
session lists `unblindedReadNodule` nodules: a nodule >= 3 mm has one or more ROIs, each a
closed contour (edgeMap points, pixel x = column, y = row) on one slice, named by its
SOP Instance UID and its `imageZposition`; `inclusion` FALSE marks a hole to cut out of
the region. A nodule < 3 mm is one ROI with a single point. `nonNodule` marks are not
nodules and are left out.

How LUNA16 turned these into annotations.csv (Setio et al., Med Image Anal 2017, and
the LUNA16 data page): nodules >= 3 mm accepted by at least 3 of the 4 radiologists;
the readers' marks of the same nodule merged, their centres and diameters averaged. The
per-reader marks and the rest (nodules < 3 mm, non-nodules, nodules of 1-2 readers) are
in annotations_excluded.csv. This module computes, per reader:

- centre: centroid of the region the contours enclose (the contour pixels themselves
  left out: readers drew the outline just outside the nodule; pixels enclosed by an
  exclusion contour cut out), over the nodule's slices, mapped to world mm with the
  series' geometry (`read_series_geometry`);
- diameter: that of the sphere of the region's volume (voxel count x pixel area x slice
  spacing). On the real LIDC-IDRI-0001/0003 nodules most per-reader values equal a
  per-reader diameter of annotations_excluded.csv (8.78 / 9.60 / 9.70 mm against 8.79 /
  9.65 / 9.70; 26.56 against 26.57), a few have no counterpart there (LUNA16 may have
  read another revision of the XML), and the consensus is within -1.0% to +3.7% of
  annotations.csv. Filling the outline pixels too puts the consensus 4-16% above
  LUNA16's, the largest axial contour diameter (pylidc's `diameter`) 17-51% above;
  it is kept as `max_axial_diameter_mm`.

`consensus_nodules` clusters the readers' nodules (different readers only, linked when
their centres are closer than the sum of their radii unless a fixed distance is given),
keeps clusters of >= 3 readers and averages them; `min_diameter_mm` applies to the
averaged diameter (annotations.csv's smallest is 3.25 mm while single readers' marks
in annotations_excluded.csv go down to 2.0 mm).

Slices outside the series (short exports): a ROI whose SOP UID is not in the series is
placed by its imageZposition on the series' slice grid extended beyond its ends (same
orientation, in-plane origin and slice step); `slices_outside` counts such slices.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image, ImageDraw

from radflow import conventions as C
from radflow.dicom.reader import ConversionError, stack_geometry

#: The columns of LUNA16's annotations.csv (world mm, LPS).
LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", C.DIAMETER_MM)
#: Roots of readers' XML files this module reads (chest radiograph reads, IdriReadMessage,
#: hold no CT nodules).
READ_MESSAGE_TAGS = ("LidcReadMessage",)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class LidcError(ValueError):
    """An XML file or its series cannot be used; the message names the file."""


# ----------------------------------------------------------------------- the XML
@dataclass(frozen=True)
class Roi:
    """One contour of one nodule on one slice: `points` (n, 2) pixel (x = column,
    y = row); `inclusion` False for a hole; `z_position_mm` the slice's z (LPS)."""

    z_position_mm: float | None
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class ReaderNodule:
    """One radiologist's nodule: `reader` is the reading session's index in the file
    (0-3), `contoured` whether it is a nodule >= 3 mm (contours) rather than < 3 mm
    (a single point)."""

    series_uid: str
    reader: int
    radiologist_id: str
    nodule_id: str
    rois: tuple[Roi, ...]

    @property
    def contoured(self) -> bool:
        return any(len(roi.points) > 1 for roi in self.rois)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str, default: str = "") -> str:
    found = _children(element, name)
    return (found[0].text or "").strip() if found else default


def _roi(element: ET.Element, where: str) -> Roi:
    points = []
    for edge in _children(element, "edgeMap"):
        try:
            points.append((int(float(_text(edge, "xCoord"))), int(float(_text(edge, "yCoord")))))
        except ValueError as exc:
            raise LidcError(f"{where}: edgeMap without integer xCoord/yCoord") from exc
    if not points:
        raise LidcError(f"{where}: roi without edgeMap points")
    z_text = _text(element, "imageZposition")
    try:
        z_mm = float(z_text) if z_text else None
    except ValueError as exc:
        raise LidcError(f"{where}: imageZposition {z_text!r} is not a number") from exc
    inclusion = _text(element, "inclusion", "TRUE").upper() != "FALSE"
    return Roi(z_mm, _text(element, "imageSOP_UID"), inclusion, np.array(points, dtype=int))


def read_lidc_xml(xml_path: str | Path) -> list[ReaderNodule]:
    """Every reader's nodules (>= 3 mm and < 3 mm; non-nodules left out) in one LIDC
    XML file, in file order. LidcError (naming the file) if it is not well-formed XML,
    not an LidcReadMessage, or a ROI is unreadable."""
    path = Path(xml_path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise LidcError(f"{path}: not a readable XML file ({exc})") from exc
    if _local(root.tag) not in READ_MESSAGE_TAGS:
        raise LidcError(f"{path}: root element {_local(root.tag)!r} is not an LidcReadMessage")
    headers = _children(root, "ResponseHeader")
    series_uid = _text(headers[0], "SeriesInstanceUid") if headers else ""
    nodules = []
    for reader, session in enumerate(_children(root, "readingSession")):
        radiologist = _text(session, "servicingRadiologistID")
        for nodule in _children(session, "unblindedReadNodule"):
            nodule_id = _text(nodule, "noduleID")
            where = f"{path}: reading session {reader + 1}, nodule {nodule_id!r}"
            rois = tuple(_roi(roi, where) for roi in _children(nodule, "roi"))
            if rois:
                nodules.append(ReaderNodule(series_uid, reader, radiologist, nodule_id, rois))
    return nodules


# --------------------------------------------------------------- series geometry
@dataclass(frozen=True)
class SeriesGeometry:
    """Where a CT series' voxels are: `affine_lps` maps (column, row, slice index) to
    world mm (LPS); `slice_of_sop` gives each SOP Instance UID its slice index."""

    series_uid: str
    affine_lps: np.ndarray
    slice_of_sop: dict[str, int]
    shape: tuple[int, int, int]  # columns, rows, slices

    @property
    def spacing_mm(self) -> np.ndarray:
        """Column, row and slice spacing (mm)."""
        return np.linalg.norm(self.affine_lps[:3, :3], axis=0)

    def slice_index(self, roi: Roi) -> tuple[float, bool]:
        """(slice index, inside the series): by SOP UID, else by imageZposition on the
        series' slice grid extended beyond its ends (a fractional index when the z
        falls between grid planes)."""
        if roi.sop_uid in self.slice_of_sop:
            return float(self.slice_of_sop[roi.sop_uid]), True
        if roi.z_position_mm is None:
            raise LidcError(f"series {self.series_uid}: ROI on SOP {roi.sop_uid} is not in "
                            "the series and has no imageZposition")  # fmt: skip
        if abs(self.affine_lps[2, 2]) < 1e-6:
            raise LidcError(f"series {self.series_uid}: ROI on SOP {roi.sop_uid} is not in "
                            "the series, whose slices do not advance along z")  # fmt: skip
        # z of slice k's first voxel is affine[2, 3] + k affine[2, 2] (in-plane axes
        # carry no z for the axial stacks of LIDC; their z terms vanish at column/row 0)
        return (roi.z_position_mm - self.affine_lps[2, 3]) / self.affine_lps[2, 2], False

    def to_world(self, index_xyk: np.ndarray) -> np.ndarray:
        """World mm (LPS) of continuous (column, row, slice) indices (n, 3)."""
        index = np.atleast_2d(np.asarray(index_xyk, float))
        return index @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]


def _dicom_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".xml"):
        try:
            out.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
    return out


def read_series_geometry(
    folder: str | Path, series_uid: str, referenced_sops: Iterable[str] = ()
) -> SeriesGeometry:
    """The geometry of series `series_uid` among the DICOM files under `folder` (headers
    only); if no file has that SeriesInstanceUID (an XML without one), the series holding
    most of `referenced_sops`. LidcError if none is found or it is not a regular stack."""
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for _, ds in _dicom_headers(Path(folder)):
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if series_uid not in by_series:
        wanted = set(referenced_sops)
        scores = {uid: sum(str(ds.SOPInstanceUID) in wanted for ds in found)
                  for uid, found in by_series.items()}  # fmt: skip
        best = max(scores, key=scores.get, default=None)
        if best is None or scores[best] == 0:
            raise LidcError(f"{folder}: no DICOM series {series_uid or '(unnamed)'} "
                            f"({len(by_series)} other series found)")  # fmt: skip
        series_uid = best
    datasets = by_series[series_uid]
    try:
        geometry = stack_geometry(datasets)
    except ConversionError as exc:
        raise LidcError(f"{folder}: series {series_uid}: {exc}") from exc
    slice_of_sop = {str(datasets[i].SOPInstanceUID): k for k, i in enumerate(geometry.order)}
    shape = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    return SeriesGeometry(series_uid, _RAS_TO_LPS @ geometry.affine, slice_of_sop, shape)


# ------------------------------------------------------------- one reader's nodule
def _fill(points: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean mask (rows, columns) over `box` (x0, y0, x1, y1 inclusive) of the pixels
    enclosed by the closed contour through `points`, the contour's own pixels left out
    (LIDC readers drew the outline just outside what it encloses); a contour that encloses
    no pixel (a point, a line) gives its own pixels."""
    x0, y0, x1, y1 = box
    shifted = [(int(x) - x0, int(y) - y0) for x, y in points]
    if len(shifted) < 3:  # a < 3 mm nodule's single point
        mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), bool)
        mask[[y for _, y in shifted], [x for x, _ in shifted]] = True
        return mask
    image = Image.new("1", (x1 - x0 + 1, y1 - y0 + 1), 0)
    draw = ImageDraw.Draw(image)
    draw.polygon(shifted, fill=1, outline=1)
    outline = Image.new("1", image.size, 0)
    ImageDraw.Draw(outline).line([*shifted, shifted[0]], fill=1)
    filled, edge = np.array(image, dtype=bool), np.array(outline, dtype=bool)
    inside = filled & ~edge
    return inside if inside.any() else edge


def nodule_region(nodule: ReaderNodule, geometry: SeriesGeometry):
    """The filled region slice by slice: [(slice index, inside the series, mask (rows,
    columns) over the nodule's box, (x0, y0))]; inclusion contours filled, exclusion
    contours (holes) removed on the same slice."""
    every = np.concatenate([roi.points for roi in nodule.rois])
    x0, y0 = every.min(axis=0)
    x1, y1 = every.max(axis=0)
    slices: dict[float, tuple[bool, np.ndarray]] = {}
    for roi in sorted(nodule.rois, key=lambda r: not r.inclusion):  # holes last
        k, inside = geometry.slice_index(roi)
        k = round(k, 3)
        mask = slices.get(k, (inside, np.zeros((y1 - y0 + 1, x1 - x0 + 1), bool)))[1]
        filled = _fill(roi.points, (x0, y0, x1, y1))
        mask = mask | filled if roi.inclusion else mask & ~filled
        slices[k] = (inside, mask)
    return [(k, inside, mask, (int(x0), int(y0))) for k, (inside, mask) in sorted(slices.items())]


def _max_axial_diameter_mm(nodule: ReaderNodule, geometry: SeriesGeometry) -> float:
    spacing = geometry.spacing_mm[:2]
    best = 0.0
    for roi in nodule.rois:
        if roi.inclusion and len(roi.points) > 1:
            mm = roi.points * spacing
            best = max(best, float(np.max(np.linalg.norm(mm[:, None] - mm[None], axis=-1))))
    return best


def measure_nodule(nodule: ReaderNodule, geometry: SeriesGeometry) -> dict:
    """One reader's nodule in world terms: centre (coordX/Y/Z, mm, LPS) of its filled
    region, diameter_mm of the sphere of its volume, the largest axial contour diameter,
    volume (mm^3), number of slices and of slices outside the series."""
    region = nodule_region(nodule, geometry)
    index_sum, voxels = np.zeros(3), 0
    for k, _, mask, (x0, y0) in region:
        rows, cols = np.nonzero(mask)
        index_sum += [cols.sum() + x0 * len(cols), rows.sum() + y0 * len(rows), k * len(cols)]
        voxels += len(cols)
    if voxels == 0:
        raise LidcError(f"series {nodule.series_uid}: reader {nodule.reader + 1} nodule "
                        f"{nodule.nodule_id!r}: empty region")  # fmt: skip
    centre = geometry.to_world(index_sum / voxels)[0]
    volume_mm3 = voxels * float(np.prod(geometry.spacing_mm))
    return dict(
        seriesuid=nodule.series_uid, reader=nodule.reader, nodule_id=nodule.nodule_id,
        contoured=nodule.contoured, coordX=centre[0], coordY=centre[1], coordZ=centre[2],
        diameter_mm=2.0 * (3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0),
        max_axial_diameter_mm=_max_axial_diameter_mm(nodule, geometry), volume_mm3=volume_mm3,
        slices=len(region), slices_outside=sum(not inside for _, inside, _, _ in region),
    )  # fmt: skip


def reader_table(nodules: Sequence[ReaderNodule], geometry: SeriesGeometry) -> pd.DataFrame:
    """`measure_nodule` of every nodule, one row each."""
    return pd.DataFrame([measure_nodule(n, geometry) for n in nodules])


# ------------------------------------------------------------------- consensus
def _clusters(table: pd.DataFrame, link_distance_mm: float | None) -> list[list[int]]:
    """Row positions of `table` (one series' contoured nodules) grouped into nodules:
    pairs of different readers closer than the link distance (default: the sum of their
    radii) are joined nearest first, a join refused when it would give a cluster two
    marks of one reader (single linkage, one mark per reader)."""
    centres = table[["coordX", "coordY", "coordZ"]].to_numpy(float)
    radii = table[C.DIAMETER_MM].to_numpy(float) / 2.0
    readers = table["reader"].to_numpy()
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    limit = radii[:, None] + radii[None] if link_distance_mm is None else link_distance_mm
    members = {i: {i} for i in range(len(table))}
    owner = list(range(len(table)))
    pairs = sorted(zip(*np.nonzero(np.triu(distance < limit, k=1)), strict=True),
                   key=lambda ij: distance[ij])  # fmt: skip
    for i, j in pairs:
        a, b = owner[i], owner[j]
        if a == b or set(readers[list(members[a])]) & set(readers[list(members[b])]):
            continue
        for k in members[b]:
            owner[k] = a
        members[a] |= members.pop(b)
    return [sorted(m) for m in members.values()]


def consensus_nodules(
    reader_nodules: pd.DataFrame,
    min_readers: int = 3,
    min_diameter_mm: float = 3.0,
    link_distance_mm: float | None = None,
) -> pd.DataFrame:
    """LUNA16's reference standard from readers' nodules (`reader_table` rows of one or
    more series): per series, the contoured (>= 3 mm) nodules clustered (`_clusters`;
    `link_distance_mm` None links two marks closer than the sum of their radii), the
    clusters marked by >= `min_readers` readers kept, their centres and diameters
    averaged, and those averaging < `min_diameter_mm` dropped. Columns: LUNA16's
    (seriesuid, coordX, coordY, coordZ, diameter_mm; mm, LPS) and n_readers."""
    rows = []
    contoured = reader_nodules[reader_nodules["contoured"].astype(bool)]
    for series_uid, table in contoured.groupby("seriesuid", sort=True):
        table = table.reset_index(drop=True)
        for members in _clusters(table, link_distance_mm):
            marks = table.iloc[members]
            if marks["reader"].nunique() < min_readers:
                continue
            mean = marks[["coordX", "coordY", "coordZ", C.DIAMETER_MM]].mean()
            if mean[C.DIAMETER_MM] >= min_diameter_mm:
                rows.append({"seriesuid": series_uid, **mean.to_dict(),
                             "n_readers": int(marks["reader"].nunique())})  # fmt: skip
    return pd.DataFrame(rows, columns=[*LUNA16_COLUMNS, "n_readers"])


# ---------------------------------------------------------------- whole scans
def scan_readers(xml_path: str | Path) -> pd.DataFrame:
    """`reader_table` of one XML file's nodules, measured on the DICOM series found
    under the XML's folder (LidcError naming the XML if there is none)."""
    xml_path = Path(xml_path)
    nodules = read_lidc_xml(xml_path)
    if not nodules:
        return pd.DataFrame(columns=["seriesuid", "reader", "contoured", *LUNA16_COLUMNS[1:]])
    referenced = [roi.sop_uid for nodule in nodules for roi in nodule.rois]
    try:
        geometry = read_series_geometry(xml_path.parent, nodules[0].series_uid, referenced)
    except LidcError as exc:
        raise LidcError(f"{xml_path}: {exc}") from exc
    # an XML without SeriesInstanceUid: its nodules take the series found for it
    nodules = [n if n.series_uid else ReaderNodule(geometry.series_uid, n.reader,
               n.radiologist_id, n.nodule_id, n.rois) for n in nodules]  # fmt: skip
    return reader_table(nodules, geometry)


def find_read_messages(root: str | Path) -> list[Path]:
    """The LIDC readers' XML files (LidcReadMessage) under `root` (or `root` itself);
    other XML files (chest radiograph reads) are left out, unparsable ones kept so that
    reading them reports the error."""
    root = Path(root)
    candidates = [root] if root.is_file() else sorted(root.rglob("*.xml"))
    found = []
    for path in candidates:
        try:
            for _, element in ET.iterparse(path, events=("start",)):
                if _local(element.tag) in READ_MESSAGE_TAGS:
                    found.append(path)
                break
        except ET.ParseError:
            found.append(path)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a scan folder (its readers' XML beside its DICOM "
                                     "series) or a folder of them")  # fmt: skip
    parser.add_argument("out", help="annotations to write (.csv, LUNA16's columns)")
    parser.add_argument("--min-readers", type=int, default=3)
    parser.add_argument("--min-diameter-mm", type=float, default=3.0)
    args = parser.parse_args(argv)
    messages = find_read_messages(args.root)
    if not messages:
        print(f"{args.root}: no LIDC readers' XML file found", file=sys.stderr)
        return 1
    try:
        readers = pd.concat([scan_readers(path) for path in messages], ignore_index=True)
    except LidcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = consensus_nodules(readers, args.min_readers, args.min_diameter_mm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table[list(LUNA16_COLUMNS)].to_csv(out, index=False)
    contoured = readers[readers["contoured"].astype(bool)]
    print(
        f"{out}: {len(table)} nodules from {len(messages)} scans ({len(contoured)} "
        f"readers' marks >= 3 mm, {len(readers) - len(contoured)} < 3 mm; "
        f"{int((contoured['slices_outside'] > 0).sum())} marks reach beyond their series)"
    )
    for row in table.itertuples():
        print(
            f"  {row.seriesuid}: ({row.coordX:.1f}, {row.coordY:.1f}, {row.coordZ:.1f}) mm, "
            f"{row.diameter_mm:.1f} mm, {row.n_readers} readers"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
