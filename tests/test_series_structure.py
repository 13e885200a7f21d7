"""Series structure from the index to the NIfTI, as dcm2niix writes it: a series is one
unit per (SeriesInstanceUID, SeriesNumber); localizers and off-orientation slices are left
out with a reason; echoes and magnitude/phase are separate units (dcm2niix's _e1/_e2/_ph
files); time points, acquisitions, b-values and repeated positions stay in ONE 4D unit in
dcm2niix's volume order; enhanced and legacy multi-frame files convert through dcm2niix;
gantry tilt and uneven spacing give dcm2niix's corrected image. Each checked against
dcm2niix run on the same files and against the DICOM positions themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from radflow import conventions as C
from radflow.dicom.convert import convert_shard, convert_unit
from radflow.dicom.headers import FileRecord, SliceKey
from radflow.dicom.index import (
    REASON_LOCALIZER,
    REASON_OFF_STACK,
    build_index,
    list_files,
    read_shard_files,
)
from radflow.dicom.units import dcm2niix_tokens, group_series, group_units

from dcm2niix_reference import assert_same_grid, run_dcm2niix, run_dcm2niix_all
from dicom_factory import (
    assert_phi_free,
    dicom_corner_ras,
    enhanced_value,
    new_uid,
    write_enhanced,
    write_labels,
    write_legacy_multiframe,
    write_volume,
    write_volumes,
)

KEY = b"radflow-test-key-0123456789abcdef"
LOCALIZER = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
#: The 4D units of the export: (name, kind of files, volumes, slices, value step between
#: consecutive volumes in dcm2niix's order; None where nothing orders the volumes).
FOUR_D = {
    "dyn": (2, 3, 500),
    "repeats": (2, 3, None),
    "fmri": (3, 4, 300),
    "dwi": (3, 3, 300),
    "mf_4d": (3, 4, 500),
}


def ser(identifier: str) -> str:
    return C.pseudonym(KEY, "ser", identifier)


def _flat(volumes: list[list[Path]]) -> list[Path]:
    return [p for v in volumes for p in v]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One labelled study of several series; some share the folder "mixed"."""
    base = tmp_path_factory.mktemp("structure")
    root = base / "dicom"
    ids = dict(patient_id="ZQXPAT9", accession="ZQXACC9")
    study = new_uid()
    rngs = (random.Random(seed) for seed in range(100, 200))  # distinct random file names
    files: dict[str, list[Path]] = {}
    uids: dict[str, str] = {}

    def series(name: str) -> dict:
        uids[name] = new_uid()
        return dict(**ids, study_uid=study, series_uid=uids[name])

    ct = series("ct")  # 5 axial slices, one sagittal LOCALIZER, one coronal slice without flag
    files["ct_axial"] = write_volume(root / "mixed", rng=next(rngs), **ct, n_slices=5)
    files["ct_localizer"] = write_volume(
        root / "mixed", rng=next(rngs), **ct, n_slices=1,
        row_cosines=(0, 1, 0), col_cosines=(0, 0, -1), extra={"ImageType": LOCALIZER},
    )  # fmt: skip
    files["ct_coronal"] = write_volume(
        root / "mixed", rng=next(rngs), **ct, n_slices=1,
        row_cosines=(1, 0, 0), col_cosines=(0, 0, -1),
    )  # fmt: skip

    mr = series("mr")  # two echoes at the same positions, in the same folder as the CT
    for echo, te in ((1, 10), (2, 25)):
        files[f"mr_echo{echo}"] = write_volume(
            root / "mixed", rng=next(rngs), **mr, modality="MR", n_slices=4, value_offset=30 * echo,
            instance_numbers=[4 * echo + k for k in range(4)],
            extra={"EchoNumbers": echo, "EchoTime": te},
        )  # fmt: skip

    # 4D series: two acquisitions (repeats of a dynamic CT), repeated positions with
    # nothing to tell the volumes apart, an fMRI time series, a diffusion series
    files["dyn"] = _flat(write_volumes(root / "dyn", [{"AcquisitionNumber": a} for a in (1, 2)],
                                       offset_step=500, rng_seed=300, **series("dyn")))  # fmt: skip
    files["repeats"] = _flat(write_volumes(root / "repeat", [{}, {}], offset_step=1,
                                           rng_seed=310, **series("repeats")))  # fmt: skip
    times = [{"TemporalPositionIdentifier": t, "NumberOfTemporalPositions": 3,
              "AcquisitionNumber": t} for t in (1, 2, 3)]  # fmt: skip
    files["fmri"] = _flat(write_volumes(root / "fmri", times, n_slices=4, modality="MR",
                                        rng_seed=320, **series("fmri")))  # fmt: skip
    dwi = [{"DiffusionBValue": b, "DiffusionGradientOrientation": g, "AcquisitionNumber": v + 1}
           for v, (b, g) in enumerate([(0, [0, 0, 0]), (1000, [1, 0, 0]), (1000, [0, 1, 0])])]  # fmt: skip
    files["dwi"] = _flat(write_volumes(root / "dwi", dwi, modality="MR", rng_seed=330,
                                       **series("dwi")))  # fmt: skip
    # magnitude and phase of one series; one series saved under two SeriesNumbers
    parts = [{"ImageType": ["ORIGINAL", "PRIMARY", p, "ND"]} for p in ("M", "P")]
    files["mp"] = _flat(write_volumes(root / "mp", parts, modality="MR", rng_seed=340,
                                      **series("mp")))  # fmt: skip
    renumbered = write_volumes(root / "renumbered", [{"SeriesNumber": 3}, {"SeriesNumber": 4}],
                               rng_seed=350, **series("renumbered"))  # fmt: skip
    files["number3"], files["number4"] = renumbered

    files["mf_mr"] = [write_enhanced(root / "enh" / "mr.dcm", **ids, modality="MR",
                                     echo_times=(10.0, 25.0), intercept=-5)]  # fmt: skip
    files["mf_4d"] = [write_enhanced(root / "enh" / "mr4d.dcm", **ids, modality="MR", n_times=3)]
    files["mf_ct"] = [write_enhanced(
        root / "enh" / "ct.dcm", **ids, modality="CT", n_slices=5, intercept=-1024,
        row_cosines=(0, 1, 0), col_cosines=(0, 0, -1), pixel_spacing=(0.9, 0.7),
    )]  # fmt: skip
    files["legacy"] = [write_legacy_multiframe(root / "enh" / "legacy.dcm", **ids)]
    for name in ("mf_mr", "mf_4d", "mf_ct", "legacy"):
        uids[name] = str(pydicom.dcmread(files[name][0], stop_before_pixels=True).SeriesInstanceUID)

    labels = write_labels(base / "labels.csv", [("ZQXACC9", "1")], ["AccessionNumber", "label"])
    index = build_index(root, labels, key=KEY, n_shards=1, threads=2, progress=False)
    results, private = base / "results", base / "private"
    index.write(results / "index", private)
    shard_tsv = private / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
    manifest = convert_shard(shard_tsv, root, results / "nifti", threads=2, progress=False)
    return dict(root=root, files=files, index=index, manifest=manifest, shard_tsv=shard_tsv,
                out=results / "nifti", results=results, uids=uids)  # fmt: skip


def pid_of(export, name: str, keys: str = "") -> str:
    uid = export["uids"][name]
    return ser(f"{uid}/{keys}" if keys else uid)


def nii(export, pid: str) -> nib.Nifti1Image:
    return nib.load(export["out"] / f"{pid}{C.NIFTI_SUFFIX}")


def sidecar(export, pid: str) -> dict:
    return json.loads((export["out"] / f"{pid}{C.SIDECAR_SUFFIX}").read_text())


def canonical(image: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(image).dataobj)


def assert_same_image(ours: nib.Nifti1Image, ref: nib.Nifti1Image) -> None:
    """Same grid (assert_same_grid), same number of volumes, identical values in order."""
    assert_same_grid(ours, ref)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(canonical(ours), canonical(ref))


def sorted_files(export, *names: str) -> list[Path]:
    """The files of these export entries in the order radflow hands them to dcm2niix
    (sorted relative paths), so that ties in dcm2niix's sort are broken alike."""
    return sorted((p for n in names for p in export["files"][n]),
                  key=lambda p: p.relative_to(export["root"]).as_posix())  # fmt: skip


EXPECTED_UNITS = {  # (name, keys): number of files
    ("ct", ""): 5,
    ("mr", "echo=1/te=10"): 4,
    ("mr", "echo=2/te=25"): 4,
    ("dyn", ""): 6,
    ("repeats", ""): 6,
    ("fmri", ""): 12,
    ("dwi", ""): 9,
    ("mp", "part=M"): 3,
    ("mp", "part=P"): 3,
    ("renumbered", "number=3"): 3,
    ("renumbered", "number=4"): 3,
    ("mf_mr", "te=10"): 1,
    ("mf_mr", "te=25"): 1,
    ("mf_4d", ""): 1,
    ("mf_ct", ""): 1,
    ("legacy", ""): 1,
}


def test_units_and_summary(export):
    expected = {pid_of(export, name, keys): n for (name, keys), n in EXPECTED_UNITS.items()}
    series = export["index"].series.set_index(C.SERIES_PID)
    assert series["n_files"].to_dict() == expected
    assert set(series[C.LABEL]) == {1}  # split units keep their series' label
    summary = export["index"].summary
    assert summary["n_units_found"] == len(EXPECTED_UNITS)
    assert summary["n_series_split"] == 3  # mr (echo), mp (part), mf_mr (te)
    assert summary["units_from_split_series"] == {"echo/te": 2, "part": 2, "te": 2}
    assert summary["files_quarantined"] == {REASON_LOCALIZER: 1, REASON_OFF_STACK: 1}
    text = export["index"].summary_text()
    assert "index: 3 series split into stacks (2 by echo/te, 2 by part, 2 by te units)" in text
    assert f"index: 1 files left out: {REASON_LOCALIZER}" in text


def test_unit_keys_column(export):
    shard = read_shard_files(export["shard_tsv"])
    keys = shard.groupby(C.SERIES_PID)[C.UNIT_KEYS].agg(set).to_dict()
    # echoes known by echo time alone also carry dcm2niix's echo count ("_e1", "_e2")
    rank = {"te=10": "te=10/echo_rank=1", "te=25": "te=25/echo_rank=2"}
    expected = {pid_of(export, name, k): {"" if name == "renumbered" else rank.get(k, k)}
                for name, k in EXPECTED_UNITS}  # fmt: skip
    assert keys == expected


def test_localizer_and_off_axis_slice_left_out_with_reason(export):
    q = export["index"].quarantine
    rows = q[q[C.REASON].isin([REASON_LOCALIZER, REASON_OFF_STACK])]
    assert sorted(rows[C.REASON]) == sorted([REASON_LOCALIZER, REASON_OFF_STACK])
    assert set(rows[C.SERIES_PID]) == {pid_of(export, "ct")}
    assert rows[C.FILE_ID].str.len().min() > 0  # one row per file, not per unit
    paths = export["index"].quarantine_paths.set_index(C.PATH)[C.REASON]
    rel = {n: export["files"][n][0].relative_to(export["root"]).as_posix()
           for n in ("ct_localizer", "ct_coronal")}  # fmt: skip
    assert paths[rel["ct_localizer"]] == REASON_LOCALIZER
    assert paths[rel["ct_coronal"]] == REASON_OFF_STACK
    shard = read_shard_files(export["shard_tsv"])
    kept = set(shard.loc[shard[C.SERIES_PID] == pid_of(export, "ct"), C.PATH])
    assert kept == {p.relative_to(export["root"]).as_posix() for p in export["files"]["ct_axial"]}


def test_frames_column_lists_each_echo(export):
    shard = read_shard_files(export["shard_tsv"])
    frames = {}
    for te in ("10", "25"):
        row = shard[shard[C.SERIES_PID] == pid_of(export, "mf_mr", f"te={te}")]
        assert len(row) == 1
        frames[te] = [int(f) for f in row[C.FRAMES].iloc[0].split()]
    assert len(frames["10"]) == len(frames["25"]) == 4
    assert sorted(frames["10"] + frames["25"]) == list(range(8))
    for name in ("mf_ct", "mf_4d", "legacy"):  # every frame of the file
        assert list(shard.loc[shard[C.SERIES_PID] == pid_of(export, name), C.FRAMES]) == [""]


def test_every_unit_converted_by_dcm2niix_with_its_dimensions(export):
    m = export["manifest"].set_index(C.SERIES_PID)
    assert set(m.index) == set(export["index"].series[C.SERIES_PID])
    assert set(m[C.STATUS]) == {C.STATUS_OK}, m[m[C.STATUS] != C.STATUS_OK][C.REASON].to_dict()
    assert set(m["route"]) == {"dcm2niix"}
    four_d = {pid_of(export, name) for name in FOUR_D}
    assert {pid for pid in m.index if int(m.loc[pid, "ndim"]) == 4} == four_d
    assert set(m.loc[list(set(m.index) - four_d), "ndim"].astype(int)) == {3}
    for name, (n_volumes, n_slices, _) in FOUR_D.items():
        pid = pid_of(export, name)
        assert m.loc[pid, "shape"] == f"10\\12\\{n_slices}\\{n_volumes}"
        meta = sidecar(export, pid)
        assert meta["ndim"] == 4 and meta["shape"] == [10, 12, n_slices, n_volumes]
        assert nii(export, pid).shape == (10, 12, n_slices, n_volumes)  # x, y, z, t


def test_localizer_free_ct_matches_dcm2niix_of_its_main_stack(export, tmp_path):
    ours = nii(export, pid_of(export, "ct"))
    assert_same_image(ours, run_dcm2niix(export["files"]["ct_axial"], tmp_path))
    assert ours.shape == (10, 12, 5)


@pytest.mark.parametrize("name", sorted(FOUR_D))
def test_4d_unit_is_dcm2niix_4d_image_in_its_volume_order(export, name, tmp_path):
    """Time points, acquisitions, b-values, repeats and enhanced temporal positions are one
    4D unit: dcm2niix's only image for those files, same grid, same volumes in the same
    order; where the volumes have an order, consecutive volumes differ by its step."""
    n_volumes, n_slices, step = FOUR_D[name]
    ours = nii(export, pid_of(export, name))
    ref = run_dcm2niix(sorted_files(export, name), tmp_path)
    assert ref.shape == (10, 12, n_slices, n_volumes)
    assert_same_image(ours, ref)
    data = canonical(ours).astype(np.int64)
    if step is not None:  # volume t holds the t-th time point / acquisition / b-value
        np.testing.assert_array_equal(np.diff(data, axis=3), step)
    else:  # repeats: both copies are there, in dcm2niix's order
        assert sorted(np.unique(data[..., 1] - data[..., 0])) in ([1], [-1])
    if name == "mf_4d":  # stored value enhanced_value(k, r, c, time=t) in the RAS voxel
        for t in range(3):  # RAS voxel (i, j, k) of this axial stack: column 9 - i, row 11 - j
            assert data[9 - 3, 11 - 2, 1, t] == enhanced_value(1, 2, 3, time=t)


def test_diffusion_unit_has_dcm2niix_gradients(export, tmp_path):
    pid = pid_of(export, "dwi")
    run_dcm2niix(sorted_files(export, "dwi"), tmp_path)
    out = tmp_path / "out"
    (bval,) = out.glob("*.bval")
    (bvec,) = out.glob("*.bvec")
    assert bval.read_text().split() == ["0", "1000", "1000"]
    # run_dcm2niix compresses; radflow's files are dcm2niix's own, byte for byte
    assert (export["out"] / f"{pid}.bval").read_bytes() == bval.read_bytes()
    assert (export["out"] / f"{pid}.bvec").read_bytes() == bvec.read_bytes()
    meta = sidecar(export, pid)["dcm2niix"]
    assert meta["bvals"] == [0.0, 1000.0, 1000.0] and len(meta["bvecs"]) == 3
    for other in ("fmri", "dyn", "mr"):  # no gradient files for anything else
        assert not list(export["out"].glob(f"{pid_of(export, other)}*.bv*"))


@pytest.mark.parametrize(
    "name, files, units",
    [
        ("mr", ("mr_echo1", "mr_echo2"), {"echo=1/te=10": "1_e1", "echo=2/te=25": "1_e2"}),
        ("mp", ("mp",), {"part=M": "1", "part=P": "1_ph"}),
        ("mf_mr", ("mf_mr",), {"te=10": "1_e1", "te=25": "1_e2"}),
        ("renumbered", ("number3", "number4"), {"number=3": "3", "number=4": "4"}),
    ],
)
def test_split_units_are_dcm2niix_separate_images(export, name, files, units, tmp_path):
    """dcm2niix writes one file per echo (_e1, _e2), per complex part (_ph) and per
    SeriesNumber; each radflow unit is exactly the file its keys name."""
    refs = run_dcm2niix_all(sorted_files(export, *files), tmp_path)
    assert sorted(refs) == sorted(f"{stem}.nii.gz" for stem in units.values())
    manifest = export["manifest"].set_index(C.SERIES_PID)
    for keys, stem in units.items():
        pid = pid_of(export, name, keys)
        assert manifest.loc[pid, C.STATUS] == C.STATUS_OK, (keys, manifest.loc[pid, C.REASON])
        ours = nii(export, pid)
        assert_same_image(ours, refs[f"{stem}.nii.gz"])
        assert ours.ndim == 3
        # radflow runs dcm2niix on the unit's files alone: a first echo gets no suffix there
        suffix = sidecar(export, pid)["dcm2niix_suffix"]
        assert set(filter(None, suffix.split("_"))) <= set(stem.split("_")[1:]), suffix
        if name == "mf_mr":
            te = float(keys.partition("=")[2])
            assert sidecar(export, pid)["dcm2niix"]["EchoTime"] == pytest.approx(te / 1000)
    values = {
        keys: canonical(nii(export, pid_of(export, name, keys))).astype(int) for keys in units
    }
    first, second = values.values()
    step = {"mr": 30, "mf_mr": 30, "mp": 300, "renumbered": 300}[name]
    np.testing.assert_array_equal(second - first, step)  # the two units are not swapped


def test_echo_sidecars(export):
    for echo, te in ((1, 10), (2, 25)):
        meta = sidecar(export, pid_of(export, "mr", f"echo={echo}/te={te}"))
        assert meta["EchoTime"] == te and meta["dcm2niix"]["EchoTime"] == pytest.approx(te / 1000)
        assert meta["n_files"] == 4


def test_enhanced_ct_matches_dcm2niix(export, tmp_path):
    ours = nii(export, pid_of(export, "mf_ct"))
    ref = run_dcm2niix(export["files"]["mf_ct"], tmp_path)
    assert_same_image(ours, ref)
    assert ours.get_data_dtype() == ref.get_data_dtype()
    assert canonical(ours).min() == enhanced_value(0, 0, 0) - 1024  # intercept applied
    assert sorted(ours.header.get_zooms()) == pytest.approx(sorted((0.7, 0.9, 2.5)))


def test_legacy_multiframe_matches_dcm2niix(export, tmp_path):
    """No functional groups: frame k at ImagePositionPatient + k * SpacingBetweenSlices
    along the normal, as dcm2niix assumes (it warns that it cannot tell the direction)."""
    ours = nii(export, pid_of(export, "legacy"))
    assert ours.shape == (10, 12, 3)
    assert_same_image(ours, run_dcm2niix(export["files"]["legacy"], tmp_path))
    data = canonical(ours)
    # canonical RAS voxel (i, j, k) of an axial LPS stack: column 9 - i, row 11 - j, frame k
    assert [data[9 - 5, 11 - 5, k] for k in range(3)] == [
        1000 + 100 * k + 40 - 1024 for k in range(3)
    ]


def test_outputs_hold_no_phi(export):
    assert_phi_free(export["results"], list_files(export["root"]))


def test_old_shard_table_without_frames_and_keys_columns_reads(tmp_path):
    old = tmp_path / "shard-000.tsv"
    pd.DataFrame({C.SERIES_PID: ["ser-a"], C.MODALITY: ["CT"], C.PATH: ["x/y.dcm"]}).to_csv(
        old, sep="\t", index=False
    )
    table = read_shard_files(old)
    assert list(table[C.FRAMES]) == [""] and list(table[C.UNIT_KEYS]) == [""]


# ------------------------------------------- gantry tilt, uneven spacing, geometry
UNEVEN = (0.0, 2.5, 5.0, 10.0, 12.5)  # one missing slice: dcm2niix resamples to 2.5 mm
OBLIQUE = ((0.96592583, 0.25881905, 0.0), (-0.0669873, 0.25, -0.96592583))  # 15 deg, 75 deg


def _ct_unit(tmp_path, name, **kwargs) -> tuple[list[Path], dict]:
    """A CT series written under tmp_path/dicom/name and converted on its own (defaults:
    uneven_spacing resample, gantry_tilt correct) into tmp_path/out."""
    root = tmp_path / "dicom"
    paths = write_volume(root / name, patient_id="ZQXPAT8", accession="ZQXACC8", **kwargs)
    rels = [p.relative_to(root).as_posix() for p in paths]
    row = convert_unit(f"ser-{name}", "CT", rels, root, tmp_path / "out")
    return paths, row


def test_tilted_uneven_ct_is_dcm2niix_tilt_eq_output(tmp_path):
    paths, row = _ct_unit(tmp_path, "tilt", slice_positions=UNEVEN, shear=(0, 0.3, 0))
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    (tmp_path / "ref").mkdir()
    refs = run_dcm2niix_all(paths, tmp_path / "ref")
    assert sorted(refs) == ["1.nii.gz", "1_Tilt_Eq_1.nii.gz"]
    ours = nib.load(tmp_path / "out" / f"ser-tilt{C.NIFTI_SUFFIX}")
    assert_same_image(ours, refs["1_Tilt_Eq_1.nii.gz"])
    assert ours.shape[2] == 6 and ours.shape != refs["1.nii.gz"].shape  # resampled, widened
    meta = json.loads((tmp_path / "out" / f"ser-tilt{C.SIDECAR_SUFFIX}").read_text())
    assert meta["dcm2niix_suffix"] == "Tilt_Eq"
    assert "gantry_tilt" in meta and "uneven_spacing" in meta
    # either correction set to "reject": the unit fails with the reason, nothing written
    root = tmp_path / "dicom"
    rels = [p.relative_to(root).as_posix() for p in paths]
    for option, words in (("gantry_tilt", "gantry tilt"), ("uneven_spacing", "uneven slice")):
        failed = convert_unit(
            "ser-x", "CT", rels, root, tmp_path / "rejected", **{option: "reject"}
        )
        assert failed[C.STATUS] == C.STATUS_FAILED and words in failed[C.REASON]
        assert not list((tmp_path / "rejected").glob("ser-x*"))


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("regular", dict(n_slices=5)),
        ("uneven", dict(slice_positions=UNEVEN)),
        ("oblique", dict(n_slices=4, row_cosines=OBLIQUE[0], col_cosines=OBLIQUE[1])),
    ],
)
def test_voxel_positions_are_the_dicom_slice_positions(tmp_path, case, kwargs):
    """From the DICOM headers alone: the voxel that holds pixel (row 0, column 0) of slice k
    lies at that slice's ImagePositionPatient (LPS -> RAS) within 0.05 mm and holds its
    value. dcm2niix stores rows bottom-up, so that voxel is (0, rows - 1, k'): voxel (0, 0,
    k') is the first pixel of the last row, at IPP + (rows - 1) * row spacing * column
    cosine. After uneven spacing is resampled, each DICOM slice sits on one output slice
    and the inserted slice is the mean of its neighbours."""
    paths, row = _ct_unit(tmp_path, case, **kwargs)
    assert row[C.STATUS] == C.STATUS_OK, row[C.REASON]
    image = nib.load(tmp_path / "out" / f"ser-{case}{C.NIFTI_SUFFIX}")
    data = np.asanyarray(image.dataobj)
    rows = 12
    hit = set()
    for path in paths:
        ras, value = dicom_corner_ras(path)
        ijk = np.linalg.solve(image.affine, [*ras, 1.0])[:3]
        index = np.round(ijk).astype(int)
        np.testing.assert_allclose((image.affine @ [*index, 1])[:3], ras, atol=0.05)
        assert tuple(index[:2]) == (0, rows - 1), (case, ijk)
        assert data[tuple(index)] == value
        ds = pydicom.dcmread(path)
        col_cosine = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        below = ras + (rows - 1) * float(ds.PixelSpacing[0]) * col_cosine * [-1, -1, 1]
        np.testing.assert_allclose((image.affine @ [0, 0, index[2], 1])[:3], below, atol=0.05)
        hit.add(int(index[2]))
    n_out = image.shape[2]
    if case == "uneven":
        assert n_out == 6 and hit == {0, 1, 2, 4, 5}
        np.testing.assert_array_equal(data[..., 3], (data[..., 2] + data[..., 4]) // 2)
    else:
        assert hit == set(range(n_out)) and n_out == len(paths)


# --------------------------------------------------- group_series on its own
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _record(path, slices, n_frames=1, image_type="ORIGINAL\\PRIMARY", **fields):
    fields = {"rows": 12, "columns": 10, "bits_allocated": 16, "series_number": "1",
              "modality": "MR", "series_uid": "S", **fields}  # fmt: skip
    return FileRecord(path=path, n_frames=n_frames, image_type=image_type, slices=slices,
                      **fields)  # fmt: skip


def _classic(path, z, orientation=AXIAL, record=None, **keys):
    position = (0.0, 0.0, z) if orientation == AXIAL else (z, 0.0, 0.0)
    key_items = tuple((k, str(v)) for k, v in keys.items())
    return _record(path, [SliceKey(None, orientation, position, key_items)], **(record or {}))


def _summary(units):
    return [(u.unit_id, sorted(f.path for f in u.files), u.split_by, u.keys, u.problem)
            for u in units]  # fmt: skip


def test_time_acquisition_bvalue_and_repeats_stay_one_unit():
    """Nothing that dcm2niix stacks into 4D splits a series (UNIT_KEYS has no time, acq
    or b-value key; repeated positions are volumes too)."""
    files = [_classic(f"t{t}z{z}", z, record={"image_type": "ORIGINAL\\PRIMARY\\M"})
             for t in (1, 2) for z in (0, 2, 4)]  # fmt: skip
    units, left_out = group_series("S", files)
    assert left_out == []
    assert _summary(units) == [("S", sorted(f.path for f in files), "", "", "")]


@pytest.mark.parametrize(
    "keys_a, keys_b, split_by, ids",
    [
        ({"echo": 1, "te": 10}, {"echo": 2, "te": 25}, "echo/te", ("echo=1/te=10", "echo=2/te=25")),
        ({"te": 10}, {"te": 25}, "te", ("te=10", "te=25")),  # + echo_rank in keys
        ({"part": "M"}, {"part": "P"}, "part", ("part=M", "part=P")),
        ({"echo": 1, "part": "M"}, {"echo": 1, "part": "P"}, "part", ("part=M", "part=P")),
    ],
)
def test_echo_and_part_split(keys_a, keys_b, split_by, ids):
    files = [_classic(f"{n}{z}", z, **keys) for n, keys in (("a", keys_a), ("b", keys_b))
             for z in (0, 2)]  # fmt: skip
    units, left_out = group_series("S", files)
    assert left_out == []
    # echoes known by echo time alone: the keys add dcm2niix's echo count (_e1, _e2)
    rank = ("/echo_rank=1", "/echo_rank=2") if split_by == "te" else ("", "")
    assert _summary(units) == [
        (f"S/{ids[0]}", ["a0", "a2"], split_by, ids[0] + rank[0], ""),
        (f"S/{ids[1]}", ["b0", "b2"], split_by, ids[1] + rank[1], ""),
    ]
    if split_by == "te":
        assert [dcm2niix_tokens(u.keys) for u in units] == [{"e1"}, {"e2"}]


def test_image_size_and_philips_trace_split():
    files = [_classic(f"s{z}", z) for z in (0, 2)]
    files += [_classic(f"big{z}", z, record={"rows": 24}) for z in (0, 2)]
    units, _ = group_series("S", files)
    assert [(u.unit_id, u.split_by) for u in units] == [
        ("S/size=12x10x16", "size"), ("S/size=24x10x16", "size"),
    ]  # fmt: skip
    files = [_classic(f"dwi{z}", z) for z in (0, 2)]
    files += [_classic(f"trace{z}", z, record={"trace": True}) for z in (0, 2)]
    units, _ = group_series("S", files)
    assert _summary(units) == [
        ("S/trace=", ["dwi0", "dwi2"], "trace", "trace=", ""),
        ("S/trace=isotropic", ["trace0", "trace2"], "trace", "trace=isotropic", ""),
    ]
    assert dcm2niix_tokens(units[1].keys) == {"ADC"}
    assert dcm2niix_tokens(units[0].keys) == set()  # "trace=": the series, not the trace


def test_series_numbers_split_and_tokens():
    files = [_classic(f"n{n}z{z}", z, record={"series_number": str(n)})
             for n in (7, 8) for z in (0, 2)]  # fmt: skip
    units, _ = group_series("S", files)
    assert [(u.unit_id, u.keys, len(u.files)) for u in units] == [
        ("S/number=7", "", 2), ("S/number=8", "", 2),
    ]  # fmt: skip
    assert dcm2niix_tokens("echo=2/te=25/part=P") == {"e2", "ph"}
    assert dcm2niix_tokens("part=M") == set() and dcm2niix_tokens("") == set()
    assert dcm2niix_tokens("part=R/echo=1") == {"real", "e1"}


def test_multiframe_file_split_by_echo_lists_its_frames():
    frames = [SliceKey(f, AXIAL, (0.0, 0.0, 2.0 * (f // 2)), (("te", "10" if f % 2 else "25"),))
              for f in range(6)]  # fmt: skip
    units, left_out = group_series("S", [_record("mf.dcm", frames, n_frames=6)])
    assert left_out == []
    assert [(u.unit_id, u.frames, u.keys) for u in units] == [
        ("S/te=10", {"mf.dcm": "1 3 5"}, "te=10/echo_rank=1"),
        ("S/te=25", {"mf.dcm": "0 2 4"}, "te=25/echo_rank=2"),
    ]


def test_off_orientation_and_localizer_slices_left_out():
    files = [_classic(f"a{z}", z) for z in (0, 2, 4)]
    files += [_classic("sag", 0, SAGITTAL)]
    files += [_record("loc", [SliceKey(None, AXIAL, (0, 0, 9))], image_type="ORIGINAL\\LOCALIZER")]
    units, left_out = group_series("S", files)
    assert _summary(units) == [("S", ["a0", "a2", "a4"], "", "", "")]
    assert sorted((rec.path, reason) for rec, reason in left_out) == [
        ("loc", REASON_LOCALIZER), ("sag", REASON_OFF_STACK),
    ]  # fmt: skip


def test_orientation_without_majority_and_localizer_series_are_left_to_fail():
    tie = [_classic("a0", 0), _classic("a1", 2), _classic("s0", 0, SAGITTAL),
           _classic("s1", 2, SAGITTAL)]  # fmt: skip
    units, left_out = group_series("S", tie)
    assert left_out == [] and [len(u.files) for u in units] == [4]
    scout = [_record("l", [SliceKey(None, AXIAL, (0, 0, 0))], image_type="ORIGINAL\\LOCALIZER")]
    units, left_out = group_series("S", scout)
    assert left_out == [] and units[0].problem.startswith("localizer series")


def test_projection_series_one_unit_per_instance():
    files = [_record(f"x{n}", [SliceKey(None, None, None)], modality="DX", sop_uid=f"sop{n}")
             for n in range(2)]  # fmt: skip
    units, left_out = group_units({"S": files})
    assert left_out == [] and [u.unit_id for u in units] == ["S/sop0", "S/sop1"]
    units, _ = group_units({"S": files[:1]})
    assert [u.unit_id for u in units] == ["S"]


@pytest.mark.parametrize(
    "shift_mm, problem",
    [
        ({}, False),  # a straight stack
        ({k: (0.0, 0.3 * k) for k in range(6)}, False),  # a gantry tilt: shift ~ distance
        ({3: (0.0, 3.0)}, True),  # one slice misplaced 3 mm: dcm2niix would write _Eq
        ({3: (0.04, 0.0)}, False),  # within the 0.05 mm tolerance
    ],
)
def test_irregular_in_plane_shift_fails_the_unit(shift_mm, problem):
    files = []
    for k in range(6):
        dx, dy = shift_mm.get(k, (0.0, 0.0))
        files.append(_record(f"s{k}", [SliceKey(None, AXIAL, (dx, dy, 2.0 * k))]))
    units, _ = group_series("S", files)
    assert len(units) == 1
    assert units[0].problem.startswith("slices shifted in-plane irregularly") == problem
