"""Real scanner data (../shared/data/real_dicom: Siemens mosaics and XA30 enhanced, GE,
Philips, nine transfer syntaxes) through the index and conversion exactly as the workflow
runs them, judged against dcm2niix run alone on the same tree: every image dcm2niix
writes is reproduced by one radflow unit (same grid, identical voxel values, same volume
order, same .bval/.bvec) or its files are quarantined for a listed reason; no mosaic stays
a 2D tile image; nothing identifying reaches the outputs."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from radflow import conventions as C
from radflow.dicom.convert import ENGINE_SIDECAR_FIELDS, convert_shard
from radflow.dicom.engine import EngineError, dcm2niix_binary
from radflow.dicom.index import (
    REASON_LOCALIZER,
    REASON_OFF_STACK,
    build_index,
    list_files,
    read_shard_files,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = DATA / "real_dicom"
KEY = b"radflow-real-dicom-test-key-0123"
N_SHARDS = 2

#: Why a dcm2niix image may have no radflow unit: its files are quarantined with one of
#: these reasons (prefixes; detailed reasons end in "(...)").
ALLOWED_QUARANTINE = (
    REASON_LOCALIZER,
    REASON_OFF_STACK,
    "localizer series (every image has ImageType LOCALIZER)",
)
#: dcm2niix files that may be matched volume by volume, by volumes of several units: the
#: Philips "_ADC" file holds the diffusion-weighted volumes plus the isotropic trace, which
#: radflow keeps as two units (the series and its trace).
VOLUMEWISE_SUFFIXES = ("_ADC",)
#: The figure this test guards (every dcm2niix image of the tree, currently all reproduced).
MIN_REPRODUCED = 30
#: Header values that must never reach the outputs.
PHI_KEYWORDS = ("PatientName", "PatientID", "InstitutionName", "AccessionNumber", "StudyDate")

pytestmark = pytest.mark.skipif(
    not ROOT.is_dir(),
    reason=f"real DICOM test data not found at {ROOT} (the shared data folder beside the "
    "project; see ../shared/data/README.md)",
)


def _dcm2niix() -> str:
    try:
        return dcm2niix_binary()
    except EngineError:
        pytest.skip("dcm2niix binary not installed (pip install dcm2niix)")


def _headers(root: Path) -> dict[str, pydicom.Dataset]:
    """{relative path: header} of every DICOM file under root (non-DICOM files left out)."""
    keywords = ["SeriesInstanceUID", "SeriesNumber", "ImageType", *PHI_KEYWORDS]
    out = {}
    for rel in list_files(root):
        try:
            out[rel] = pydicom.dcmread(root / rel, stop_before_pixels=True,
                                       specific_tags=keywords)  # fmt: skip
        except pydicom.errors.InvalidDicomError:
            continue
    return out


def _index_and_convert(root: Path, headers: dict[str, pydicom.Dataset], base: Path):
    """Index `root` (every series labelled) and convert every shard, as the workflow does;
    returns (index result, manifests, results folder, private folder)."""
    uids = sorted({str(ds.SeriesInstanceUID) for ds in headers.values()})
    labels = base / "labels.csv"
    pd.DataFrame({"SeriesInstanceUID": uids, "label": "1"}).to_csv(labels, index=False)
    results, private = base / "results", base / "private"
    index = build_index(root, labels, label_key="SeriesInstanceUID", label_column="label",
                        positive_value="1", patient_key="PatientID", key=KEY,
                        n_shards=N_SHARDS, threads=2, progress=False)  # fmt: skip
    index.write(results / "index", private)
    manifests = []
    for shard in range(N_SHARDS):
        name = C.shard_name(shard)
        manifests.append(convert_shard(private / C.SHARD_INDEX_DIR / f"{name}.tsv", root,
                                       results / "nifti" / name, threads=2, progress=False))  # fmt: skip
    return index, manifests, results, private


def _dcm2niix_tree(binary: str, root: Path, reference: Path) -> Path:
    reference.mkdir()
    subprocess.run([binary, "-z", "n", "-b", "y", "-f", "%s_%j", "-o", str(reference), str(root)],
                   check=True, capture_output=True)  # fmt: skip
    return reference


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    binary = _dcm2niix()
    base = tmp_path_factory.mktemp("real")
    headers = _headers(ROOT)
    start = time.perf_counter()
    index, manifests, results, private = _index_and_convert(ROOT, headers, base)
    seconds = time.perf_counter() - start
    reference = _dcm2niix_tree(binary, ROOT, base / "dcm2niix")
    shards = pd.concat([read_shard_files(private / C.SHARD_INDEX_DIR / f"{C.shard_name(k)}.tsv")
                        for k in range(N_SHARDS)])  # fmt: skip
    return dict(headers=headers, index=index, manifest=pd.concat(manifests), shards=shards,
                results=results, reference=reference, seconds=seconds)  # fmt: skip


def _unit_files(run) -> dict[str, dict]:
    """{series_pid: {"nii", "series" (SeriesNumber, SeriesInstanceUID), "paths"}}."""
    out: dict[str, dict] = {}
    for pid, group in run["shards"].groupby(C.SERIES_PID):
        series = {(str(run["headers"][p].get("SeriesNumber", "")),
                   str(run["headers"][p].SeriesInstanceUID)) for p in group[C.PATH]}  # fmt: skip
        assert len(series) == 1, f"{pid} mixes series {series}"
        found = list(run["results"].glob(f"nifti/*/{pid}{C.NIFTI_SUFFIX}"))
        assert len(found) == 1, pid
        out[pid] = dict(nii=found[0], series=series.pop(), paths=set(group[C.PATH]))
    return out


def _reference_name(path: Path) -> tuple[tuple[str, str], str]:
    """File name to series and suffix: 601_1.3.46...949_ADC.nii -> (("601", uid), "_ADC")."""
    number, rest = path.name[: -len(".nii")].split("_", 1)
    uid = rest.split("_", 1)[0]
    return (number, uid), rest[len(uid) :]


class Volumes:
    """An image reoriented to RAS (nib.as_closest_canonical) and split into 3D volumes."""

    def __init__(self, path: Path):
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asanyarray(image.dataobj)
        self.shape = data.shape[:3]
        self.zooms = np.array(image.header.get_zooms()[:3], float)
        self.affine = image.affine
        self.volumes = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]

    def same_grid(self, other: Volumes) -> bool:
        if self.shape != other.shape or not np.allclose(self.zooms, other.zooms, atol=1e-3):
            return False
        corners = np.array([[i, j, k, 1] for i in (0, self.shape[0] - 1)
                            for j in (0, self.shape[1] - 1) for k in (0, self.shape[2] - 1)],
                           float).T  # fmt: skip
        return bool(np.allclose(self.affine @ corners, other.affine @ corners, atol=0.05))


def _quarantined(run) -> dict[str, str]:
    q = run["index"].quarantine_paths
    return dict(zip(q[C.PATH], q[C.REASON], strict=True))


@pytest.fixture(scope="module")
def matching(run):
    """Match every dcm2niix image with radflow's units of the same series (number, uid)."""
    units = _unit_files(run)
    ours = {pid: Volumes(u["nii"]) for pid, u in units.items()}
    by_series = defaultdict(list)
    for pid, u in units.items():
        by_series[u["series"]].append(pid)
    quarantined = _quarantined(run)
    whole: dict[Path, str] = {}  # dcm2niix file -> the unit that reproduces it
    volumewise: dict[Path, list[tuple[str, int]]] = {}  # file -> (unit, volume) per volume
    excused: dict[Path, set[str]] = {}  # file -> quarantine reasons of its series' files
    failures = []
    references = sorted(run["reference"].glob("*.nii"))
    for ref_path in references:
        series, suffix = _reference_name(ref_path)
        ref = Volumes(ref_path)
        candidates = [pid for pid in by_series.get(series, []) if ours[pid].same_grid(ref)]
        hits = [pid for pid in candidates if len(ours[pid].volumes) == len(ref.volumes)
                and all(np.array_equal(a, b) for a, b in zip(ours[pid].volumes, ref.volumes,
                                                            strict=True))]  # fmt: skip
        if hits and not suffix.endswith(VOLUMEWISE_SUFFIXES):
            assert len(hits) == 1, (ref_path.name, hits)
            whole[ref_path] = hits[0]
            continue
        if suffix.endswith(VOLUMEWISE_SUFFIXES):
            found = []
            for volume in ref.volumes:
                found += [next(((pid, t) for pid in candidates
                                for t, ours_t in enumerate(ours[pid].volumes)
                                if np.array_equal(ours_t, volume)), None)]  # fmt: skip
            if None not in found:
                volumewise[ref_path] = found
                continue
        files = [p for p, ds in run["headers"].items()
                 if (str(ds.get("SeriesNumber", "")), str(ds.SeriesInstanceUID)) == series]  # fmt: skip
        reasons = {quarantined.get(p, "") for p in files}
        allowed = [p for p in files if quarantined.get(p, "").startswith(ALLOWED_QUARANTINE)]
        # a whole series left out, or dcm2niix's extra image of the files left out of one
        # (a localizer it writes as "_i00002": no more slices than those files)
        if allowed and (len(allowed) == len(files)
                        or ref.shape[2] * len(ref.volumes) <= len(allowed)):  # fmt: skip
            excused[ref_path] = reasons
        else:
            failures.append((ref_path.name, candidates, sorted(reasons)))
    return dict(units=units, ours=ours, references=references, whole=whole,
                volumewise=volumewise, excused=excused, failures=failures)  # fmt: skip


def test_every_unit_converts_through_dcm2niix(run):
    m = run["manifest"]
    assert len(m) == run["index"].summary["n_units"] == 30
    assert set(m[C.STATUS]) == {C.STATUS_OK}, m[m[C.STATUS] != C.STATUS_OK].to_dict("records")
    assert set(m["route"]) == {"dcm2niix"}
    # only the non-DICOM files of the tree (notes, reference NIfTIs) are quarantined
    q = run["index"].quarantine_paths
    assert set(q[C.REASON]) == {"not a DICOM file"}
    assert not set(q[C.PATH]) & set(run["headers"])


def test_every_dcm2niix_image_reproduced_or_quarantined(run, matching):
    """The figure: N of M dcm2niix images reproduced (whole files in the same volume order,
    or for the Philips _ADC file volume by volume), the rest quarantined with an allowed
    reason; every radflow unit reproduces something of dcm2niix's."""
    m = matching
    n_total = len(m["references"])
    n_reproduced = len(m["whole"]) + len(m["volumewise"])
    n_volumes = sum(len(Volumes(p).volumes) for p in [*m["whole"], *m["volumewise"]])
    print(f"\nreal_dicom: {n_reproduced} of {n_total} dcm2niix images reproduced by radflow "
          f"units ({n_volumes} volumes), {len(m['excused'])} quarantined with an allowed "
          f"reason; index + convert {run['seconds']:.1f} s")  # fmt: skip
    assert m["failures"] == []
    assert n_reproduced + len(m["excused"]) == n_total
    assert n_reproduced >= MIN_REPRODUCED
    # one unit per whole file, and no unit left without a dcm2niix counterpart
    assert len(set(m["whole"].values())) == len(m["whole"])
    used = set(m["whole"].values()) | {pid for found in m["volumewise"].values()
                                       for pid, _ in found}  # fmt: skip
    assert used == set(m["units"])


def test_philips_adc_file_is_the_series_plus_its_trace_unit(matching):
    """dcm2niix's _ADC file (16 diffusion volumes + the isotropic trace) is covered by two
    radflow units: the 16-volume series in dcm2niix's order and the 3D trace."""
    (adc, found), = matching["volumewise"].items()  # fmt: skip
    assert adc.name.endswith("_ADC.nii") and len(found) == 17
    series_pid = found[0][0]
    assert found[:16] == [(series_pid, t) for t in range(16)]
    trace_pid, t = found[16]
    assert trace_pid != series_pid and t == 0
    assert len(matching["ours"][trace_pid].volumes) == 1
    assert matching["whole"][adc.with_name(adc.name.replace("_ADC", ""))] == series_pid


def _dcm2niix_alone(paths: list[str], folder: Path) -> list[Path]:
    """dcm2niix (the test's flags) on just these files of the tree: its .nii outputs."""
    (folder / "in").mkdir(parents=True)
    (folder / "out").mkdir()
    for n, rel in enumerate(sorted(paths)):
        (folder / "in" / f"{n:05d}.dcm").symlink_to(ROOT / rel)
    subprocess.run([_dcm2niix(), "-z", "n", "-b", "y", "-f", "%s_%j", "-o", str(folder / "out"),
                    str(folder / "in")], check=True, capture_output=True)  # fmt: skip
    return sorted((folder / "out").glob("*.nii"))


def test_diffusion_gradients_identical_to_dcm2niix(matching, tmp_path):
    """.bval/.bvec of a unit are dcm2niix's bytes: those of the whole-tree image it
    reproduces, or, for the Philips trace unit (part of dcm2niix's _ADC file, which has no
    gradient files), those dcm2niix writes for the trace images alone (b=2000, no .bvec)."""
    units = matching["units"]
    with_gradients = {pid for pid, u in units.items() for suffix in (".bval", ".bvec")
                      if u["nii"].with_name(f"{pid}{suffix}").exists()}  # fmt: skip
    pairs = [(ref_path, pid) for ref_path, pid in matching["whole"].items()]
    partial = {pid for found in matching["volumewise"].values() for pid, _ in found}
    for pid in sorted(partial - set(matching["whole"].values())):
        (alone,) = _dcm2niix_alone(list(units[pid]["paths"]), tmp_path / pid)
        pairs.append((alone, pid))
    expected = set()
    for ref_path, pid in pairs:
        for suffix in (".bval", ".bvec"):
            ref = ref_path.with_suffix(suffix)
            ours = units[pid]["nii"].with_name(f"{pid}{suffix}")
            assert ours.exists() == ref.exists(), (ref.name, pid, suffix)
            if ref.exists():
                expected.add(pid)
                assert ours.read_bytes() == ref.read_bytes(), (ref.name, pid)
    assert with_gradients == expected
    assert len(expected) == 3  # GE DTI, Philips DTI and its trace
    bvals = {pid: units[pid]["nii"].with_name(f"{pid}.bval").read_text().split()
             for pid in expected}  # fmt: skip
    assert sorted(len(v) for v in bvals.values()) == [1, 7, 16]
    assert ["2000"] in bvals.values()


def test_mosaics_are_unpacked_never_2d_tiles(run, matching):
    mosaics = {p for p, ds in run["headers"].items() if "MOSAIC" in list(ds.get("ImageType", []))}
    assert len(mosaics) >= 9 + 8  # transfer syntaxes + the siemens_mosaic series
    manifest = run["manifest"].set_index(C.SERIES_PID)
    seen = set()
    for pid, u in matching["units"].items():
        if not u["paths"] & mosaics:
            continue
        assert u["paths"] <= mosaics, pid  # a unit is all mosaic or none
        seen |= u["paths"]
        row = manifest.loc[pid]
        shape = [int(v) for v in row["shape"].split("\\")]
        assert int(row["ndim"]) in (3, 4) and shape[:2] == [64, 64] and shape[2] > 1, (pid, shape)
        assert matching["ours"][pid].shape[2] > 1 and nib.load(u["nii"]).shape[:2] == (64, 64)
    assert seen == mosaics


def test_outputs_hold_no_phi_or_paths(run):
    """No PatientName, PatientID, InstitutionName, AccessionNumber or StudyDate of the source
    headers and no source path or folder name in any output file (.nii.gz decompressed).
    Voxel bytes are searched for the longer values only: 3-4 bytes occur in image data by
    chance; headers, extensions and text files are searched for every value."""
    values = {str(ds.get(k, "")).strip() for ds in run["headers"].values() for k in PHI_KEYWORDS}
    values |= {str(ds.PatientName).replace("^", " ") for ds in run["headers"].values()
               if "PatientName" in ds}  # fmt: skip
    rels = list_files(ROOT)
    # folder names, except one that is a sidecar field name ("SliceTiming" in GE's tree)
    parts = {part for rel in rels for part in Path(rel).parts[:-1]} - set(ENGINE_SIDECAR_FIELDS)
    needles = {v for v in values | parts | set(rels) | {str(ROOT), ROOT.name} if len(v) >= 3}
    assert {"Landman_234480", "20180517", "Vanderbilt_2018", "USC"} <= needles
    files = [p for p in run["results"].rglob("*") if p.is_file()]
    assert any(p.name.endswith(C.NIFTI_SUFFIX) for p in files)

    def pattern(words):
        return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))

    every, longer = pattern(needles), pattern(n for n in needles if len(n) >= 5)
    for path in files:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        text = data.decode("latin-1")
        if path.name.endswith((".nii", ".nii.gz")):
            offset = int(nib.Nifti1Header.from_fileobj(io.BytesIO(data))["vox_offset"])
            head, body = text[:offset], text[offset:]
        else:
            head, body = text, ""
        found = every.search(head) or longer.search(body)
        assert found is None, (path.name, found and found[0])


def test_mosaic_that_dcm2niix_cannot_read_is_refused_not_passed_as_2d(tmp_path):
    """A real Siemens mosaic re-saved deflated (a syntax dcm2niix cannot read) goes to
    radflow's own reader, which cannot unpack mosaics: the unit fails with both reasons
    rather than coming out as a 2D picture of tiles."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from radflow.dicom.convert import convert_unit

    source = sorted((ROOT / "siemens_mosaic").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    assert "MOSAIC" in ds.ImageType
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "mosaic.dcm", enforce_file_format=True)
    row = convert_unit("ser-m", "MR", ["mosaic.dcm"], tmp_path / "in", tmp_path / "out")
    assert (row[C.STATUS], row["route"]) == (C.STATUS_FAILED, "radflow")
    assert row[C.REASON] == (
        "Siemens MOSAIC needs dcm2niix to unpack it, but deflated transfer syntax: "
        "dcm2niix cannot read it"
    )
    assert not list((tmp_path / "out").glob("ser-m*"))


@pytest.mark.skipif(not (DATA / "lidc").is_dir(), reason=f"LIDC slabs not found at {DATA}")
def test_real_lidc_ct_slabs_equal_dcm2niix(tmp_path):
    """The three real LIDC-IDRI chest CT slabs (another vendor export, 512x512, 1.25-2.5 mm;
    reader XML files beside them): one unit per series, each dcm2niix's image voxel for
    voxel with the same affine; the XML files are quarantined as not DICOM."""
    root = DATA / "lidc"
    index, manifests, results, _ = _index_and_convert(root, _headers(root), tmp_path)
    manifest = pd.concat(manifests)
    assert list(manifest[C.STATUS]) == [C.STATUS_OK] * 3
    assert set(manifest["route"]) == {"dcm2niix"}
    assert set(index.quarantine[C.REASON]) == {"not a DICOM file"}
    references = [nib.as_closest_canonical(nib.load(p)) for p in
                  sorted(_dcm2niix_tree(_dcm2niix(), root, tmp_path / "ref").glob("*.nii"))]  # fmt: skip
    assert len(references) == 3
    for pid in manifest[C.SERIES_PID]:
        ours = nib.as_closest_canonical(nib.load(next(results.rglob(f"{pid}{C.NIFTI_SUFFIX}"))))
        same = [r for r in references if r.shape == ours.shape
                and np.array_equal(np.asarray(r.dataobj), np.asarray(ours.dataobj))]  # fmt: skip
        assert len(same) == 1, pid
        np.testing.assert_allclose(ours.affine, same[0].affine, atol=0.05)
        assert ours.shape[:2] == (512, 512)
