"""Series structure from the index to the NIfTI: localizers left out of their series, a
series split into stacks (echoes, time points, acquisitions), enhanced multi-frame files
split into 3D volumes through their functional groups; each checked against dcm2niix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.dicom.convert import ConversionError, convert_shard, frame_view
from radflow.dicom.index import (
    REASON_LOCALIZER,
    REASON_OFF_STACK,
    FileRecord,
    SliceKey,
    build_index,
    list_files,
    read_shard_files,
    split_series,
)

from dcm2niix_reference import assert_same_grid, run_dcm2niix, run_dcm2niix_all
from dicom_factory import (
    assert_phi_free,
    enhanced_value,
    new_uid,
    write_enhanced,
    write_labels,
    write_legacy_multiframe,
    write_volume,
)

KEY = b"radflow-test-key-0123456789abcdef"
LOCALIZER = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def ser(identifier: str) -> str:
    return C.pseudonym(KEY, "ser", identifier)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One labelled study of several series; two of them share the folder "mixed"."""
    base = tmp_path_factory.mktemp("structure")
    root = base / "dicom"
    ids = dict(patient_id="ZQXPAT9", accession="ZQXACC9")
    study = new_uid()
    rngs = (random.Random(seed) for seed in range(100, 200))  # distinct random file names
    files: dict[str, list[Path]] = {}

    ct = new_uid()  # 5 axial slices, one sagittal LOCALIZER, one coronal slice without flag
    files["ct_axial"] = write_volume(root / "mixed", rng=next(rngs), **ids, study_uid=study, series_uid=ct,
                                     n_slices=5)  # fmt: skip
    files["ct_localizer"] = write_volume(
        root / "mixed", rng=next(rngs), **ids, study_uid=study, series_uid=ct, n_slices=1,
        row_cosines=(0, 1, 0), col_cosines=(0, 0, -1), extra={"ImageType": LOCALIZER},
    )  # fmt: skip
    files["ct_coronal"] = write_volume(
        root / "mixed", rng=next(rngs), **ids, study_uid=study, series_uid=ct, n_slices=1,
        row_cosines=(1, 0, 0), col_cosines=(0, 0, -1),
    )  # fmt: skip

    mr = new_uid()  # two echoes at the same positions, in the same folder as the CT
    for echo, te in ((1, 10), (2, 25)):
        files[f"mr_echo{echo}"] = write_volume(
            root / "mixed", rng=next(rngs), **ids, study_uid=study, series_uid=mr, modality="MR", n_slices=4,
            value_offset=30 * echo,
            instance_numbers=[4 * echo + k for k in range(4)], extra={"EchoNumbers": echo, "EchoTime": te},
        )  # fmt: skip

    # two acquisitions (repeats) at the same positions; InstanceNumbers run on across them
    # as scanners write them (dcm2niix mixes the volumes when they repeat)
    dyn = new_uid()
    for acq in (1, 2):
        files[f"ct_acq{acq}"] = write_volume(
            root / "dyn", rng=next(rngs), **ids, study_uid=study, series_uid=dyn, n_slices=3,
            value_offset=500 * acq,
            instance_numbers=[3 * acq + k for k in range(3)], extra={"AcquisitionNumber": acq},
        )  # fmt: skip

    repeats = new_uid()  # repeated positions and nothing to tell the stacks apart
    for copy in (0, 1):
        files[f"ct_repeat{copy}"] = write_volume(
            root / "repeat", rng=next(rngs), **ids, study_uid=study, series_uid=repeats, n_slices=3,
            value_offset=copy,
        )  # fmt: skip

    files["mf_mr"] = [write_enhanced(root / "enh" / "mr.dcm", **ids, modality="MR",
                                     echo_times=(10.0, 25.0), intercept=-5)]  # fmt: skip
    files["mf_ct"] = [write_enhanced(
        root / "enh" / "ct.dcm", **ids, modality="CT", n_slices=5, intercept=-1024,
        row_cosines=(0, 1, 0), col_cosines=(0, 0, -1), pixel_spacing=(0.9, 0.7),
    )]  # fmt: skip
    files["legacy"] = [write_legacy_multiframe(root / "enh" / "legacy.dcm", **ids)]
    labels = write_labels(base / "labels.csv", [("ZQXACC9", "1")], ["AccessionNumber", "label"])
    index = build_index(root, labels, key=KEY, n_shards=1, threads=2, progress=False)
    results, private = base / "results", base / "private"
    index.write(results / "index", private)
    shard_tsv = private / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
    manifest = convert_shard(shard_tsv, root, results / "nifti", progress=False)
    uids = dict(ct=ct, mr=mr, dyn=dyn, repeats=repeats)
    return dict(root=root, files=files, index=index, manifest=manifest, shard_tsv=shard_tsv,
                out=results / "nifti", results=results, uids=uids)  # fmt: skip


def nii(export, pid: str) -> nib.Nifti1Image:
    return nib.load(export["out"] / f"{pid}{C.NIFTI_SUFFIX}")


def sidecar(export, pid: str) -> dict:
    return json.loads((export["out"] / f"{pid}{C.SIDECAR_SUFFIX}").read_text())


def mf_uid(export, name: str) -> str:
    import pydicom

    return str(pydicom.dcmread(export["files"][name][0], stop_before_pixels=True).SeriesInstanceUID)


def test_units_and_summary(export):
    u = export["uids"]
    mr_mf = mf_uid(export, "mf_mr")
    expected = {
        ser(u["ct"]): 5,
        ser(f"{u['mr']}/echo=1"): 4,
        ser(f"{u['mr']}/echo=2"): 4,
        ser(f"{u['dyn']}/acq=1"): 3,
        ser(f"{u['dyn']}/acq=2"): 3,
        ser(u["repeats"]): 6,
        ser(f"{mr_mf}/te=10.0"): 1,
        ser(f"{mr_mf}/te=25.0"): 1,
        ser(mf_uid(export, "mf_ct")): 1,
        ser(mf_uid(export, "legacy")): 1,
    }
    series = export["index"].series.set_index(C.SERIES_PID)
    assert series["n_files"].to_dict() == expected
    assert set(series[C.LABEL]) == {1}  # split units keep their series' label
    summary = export["index"].summary
    assert summary["n_series_split"] == 3
    assert summary["units_from_split_series"] == {"acq": 2, "echo": 2, "te": 2}
    assert summary["files_quarantined"] == {REASON_LOCALIZER: 1, REASON_OFF_STACK: 1}
    text = export["index"].summary_text()
    assert "index: 3 series split into stacks (2 by acq, 2 by echo, 2 by te units)" in text
    assert f"index: 1 files left out: {REASON_LOCALIZER}" in text


def test_localizer_and_off_axis_slice_left_out_with_reason(export):
    q = export["index"].quarantine
    rows = q[q[C.REASON].isin([REASON_LOCALIZER, REASON_OFF_STACK])]
    assert sorted(rows[C.REASON]) == sorted([REASON_LOCALIZER, REASON_OFF_STACK])
    assert set(rows[C.SERIES_PID]) == {ser(export["uids"]["ct"])}
    assert rows[C.FILE_ID].str.len().min() > 0  # one row per file, not per unit
    shard = read_shard_files(export["shard_tsv"])
    kept = set(shard.loc[shard[C.SERIES_PID] == ser(export["uids"]["ct"]), C.PATH])
    rel = {p.relative_to(export["root"]).as_posix() for p in export["files"]["ct_axial"]}
    assert kept == rel


def test_frames_column_lists_each_echo(export):
    shard = read_shard_files(export["shard_tsv"])
    mr_mf = mf_uid(export, "mf_mr")
    frames = {}
    for echo in ("10.0", "25.0"):
        row = shard[shard[C.SERIES_PID] == ser(f"{mr_mf}/te={echo}")]
        assert len(row) == 1
        frames[echo] = [int(f) for f in row[C.FRAMES].iloc[0].split()]
    assert len(frames["10.0"]) == len(frames["25.0"]) == 4
    assert sorted(frames["10.0"] + frames["25.0"]) == list(range(8))
    whole = shard[shard[C.SERIES_PID] == ser(mf_uid(export, "mf_ct"))]
    assert list(whole[C.FRAMES]) == [""]  # every frame of the file


def test_every_unit_converted_or_rejected_with_reason(export):
    m = export["manifest"].set_index(C.SERIES_PID)
    assert set(m.index) == set(export["index"].series[C.SERIES_PID])
    failed = m[m[C.STATUS] == C.STATUS_FAILED]
    assert list(failed.index) == [ser(export["uids"]["repeats"])]
    assert "share a position" in failed[C.REASON].iloc[0]
    assert "echo, time point, acquisition or b-value" in failed[C.REASON].iloc[0]


def _volumes_3d(images: dict[str, nib.Nifti1Image]) -> list[nib.Nifti1Image]:
    """dcm2niix's outputs as 3D images (a 4D output gives one per volume)."""
    out = []
    for img in images.values():
        data = np.asarray(img.get_fdata())
        if data.ndim == 3:
            out.append(img)
        else:
            out.extend(nib.Nifti1Image(data[..., t], img.affine) for t in range(data.shape[3]))
    return out


def _by_echo_value(images: dict[str, nib.Nifti1Image], ours: nib.Nifti1Image):
    """The dcm2niix output with the same voxel values as `ours` (after reorientation)."""
    data = nib.as_closest_canonical(ours).get_fdata()
    hits = [img for img in _volumes_3d(images)
            if nib.as_closest_canonical(img).shape == data.shape
            and np.array_equal(nib.as_closest_canonical(img).get_fdata(), data)]  # fmt: skip
    assert len(hits) == 1
    return hits[0]


def test_localizer_free_ct_matches_dcm2niix_of_its_main_stack(export, tmp_path):
    ref = run_dcm2niix_all(export["files"]["ct_axial"], tmp_path)
    assert len(ref) == 1
    ours = nii(export, ser(export["uids"]["ct"]))
    assert_same_grid(ours, *ref.values())
    np.testing.assert_array_equal(
        nib.as_closest_canonical(ours).get_fdata(),
        nib.as_closest_canonical(*ref.values()).get_fdata(),
    )


@pytest.mark.parametrize("kind", ["mr", "dyn"])
def test_split_stacks_match_dcm2niix(export, kind, tmp_path):
    """dcm2niix writes one file per echo (_e1, _e2) and one 4D file for the repeated
    acquisitions; each radflow unit is exactly one of those 3D volumes: same grid, same
    values."""
    names = {"mr": ("mr_echo1", "mr_echo2"), "dyn": ("ct_acq1", "ct_acq2")}[kind]
    keys = {"mr": ("echo=1", "echo=2"), "dyn": ("acq=1", "acq=2")}[kind]
    refs = run_dcm2niix_all([p for n in names for p in export["files"][n]], tmp_path)
    assert len(_volumes_3d(refs)) == 2, sorted(refs)
    matched = set()
    for key, offset in zip(keys, (30, 60) if kind == "mr" else (500, 1000), strict=True):
        ours = nii(export, ser(f"{export['uids'][kind]}/{key}"))
        ref = _by_echo_value(refs, ours)
        assert_same_grid(ours, ref)
        matched.add(id(ref))
        volume = nib.as_closest_canonical(ours).get_fdata()
        assert volume.shape[2] in (3, 4)
        # canonical (RAS) voxel (5, 5, 0) is column 4, row 6 of the lowest slice; HU = -1024
        assert volume[5, 5, 0] == -1024 + offset + 1000 + 7 * 6 + 4
    assert len(matched) == 2
    if kind == "mr":
        assert sidecar(export, ser(f"{export['uids']['mr']}/echo=2"))["EchoTime"] == 25


def test_enhanced_mr_echoes_match_dcm2niix(export, tmp_path):
    """dcm2niix writes the two echoes of the enhanced file as _e1 and _e2; radflow writes
    one 3D unit per echo with the same grid and values. (Without a DimensionIndexSequence
    dcm2niix mixes the echoes of such a file; radflow reads the frame's echo time.)"""
    refs = run_dcm2niix_all(export["files"]["mf_mr"], tmp_path)
    assert sorted(refs) == ["1_e1.nii.gz", "1_e2.nii.gz"]
    uid = mf_uid(export, "mf_mr")
    for e, te in enumerate(("10.0", "25.0")):
        pid = ser(f"{uid}/te={te}")
        ours = nii(export, pid)
        ref = _volumes_3d(refs)[e]
        assert_same_grid(ours, ref)
        np.testing.assert_array_equal(
            nib.as_closest_canonical(ours).get_fdata(), nib.as_closest_canonical(ref).get_fdata()
        )
        data = ours.get_fdata()
        for k in range(4):  # voxel (i=col 3, j=row 2, k) by the DICOM definition
            assert data[3, 2, k] == enhanced_value(k, 2, 3, e) - 5
        meta = sidecar(export, pid)
        assert meta["EchoTime"] == float(te) and meta["multi_frame"] is True
        assert meta["n_slices_read"] == 4 and meta["n_files"] == 1


def test_enhanced_ct_matches_dcm2niix(export, tmp_path):
    refs = run_dcm2niix_all(export["files"]["mf_ct"], tmp_path)
    assert len(refs) == 1
    ours = nii(export, ser(mf_uid(export, "mf_ct")))
    ref = next(iter(refs.values()))
    assert_same_grid(ours, ref)
    np.testing.assert_array_equal(
        nib.as_closest_canonical(ours).get_fdata(), nib.as_closest_canonical(ref).get_fdata()
    )
    assert ours.get_data_dtype() == np.int16 and ours.header.get_zooms() == pytest.approx(
        (0.7, 0.9, 2.5)
    )


def test_legacy_multiframe_matches_dcm2niix(export, tmp_path):
    """No functional groups: frame k at ImagePositionPatient + k * SpacingBetweenSlices
    along the normal, which is what dcm2niix assumes too (it warns that it cannot tell the
    slice direction)."""
    pid = ser(mf_uid(export, "legacy"))
    shard = read_shard_files(export["shard_tsv"])
    assert list(shard.loc[shard[C.SERIES_PID] == pid, C.FRAMES]) == [""]
    ours = nii(export, pid)
    assert ours.shape == (10, 12, 3)
    assert [ours.get_fdata()[5, 5, k] for k in range(3)] == [1000 + 100 * k + 40 - 1024
                                                             for k in range(3)]  # fmt: skip
    ref = run_dcm2niix(export["files"]["legacy"], tmp_path)
    assert_same_grid(ours, ref)
    np.testing.assert_array_equal(
        nib.as_closest_canonical(ours).get_fdata(), nib.as_closest_canonical(ref).get_fdata()
    )


def test_legacy_multiframe_without_geometry_rejected(export, tmp_path):
    import pydicom

    ds = pydicom.dcmread(export["files"]["legacy"][0])
    del ds.SpacingBetweenSlices, ds.SliceThickness
    with pytest.raises(ConversionError, match="legacy multi-frame file without"):
        frame_view(ds, 1)


def test_outputs_hold_no_phi(export):
    assert_phi_free(export["results"], list_files(export["root"]))


def test_old_shard_table_without_frames_column_reads(tmp_path):
    old = tmp_path / "shard-000.tsv"
    pd.DataFrame({C.SERIES_PID: ["ser-a"], C.MODALITY: ["CT"], C.PATH: ["x/y.dcm"]}).to_csv(
        old, sep="\t", index=False
    )
    table = read_shard_files(old)
    assert list(table[C.FRAMES]) == [""]


# ------------------------------------------------------ split_series on its own
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _record(path, slices, n_frames=1, image_type="ORIGINAL\\PRIMARY"):
    return FileRecord(path=path, n_frames=n_frames, image_type=image_type, slices=slices)


def _classic(path, z, orientation=AXIAL, **keys):
    position = (0.0, 0.0, z) if orientation == AXIAL else (z, 0.0, 0.0)
    key_items = tuple((k, str(v)) for k, v in keys.items())
    return _record(path, [SliceKey(None, orientation, position, key_items)])


def test_split_by_stack_id_first_then_orientation_per_stack():
    """An enhanced file with an axial and a sagittal stack of 3 frames each: one unit per
    StackID (without the split the two orientations would tie and fail)."""
    frames = [SliceKey(f, AXIAL if f < 3 else SAGITTAL,
                       (0.0, 0.0, 2.0 * f) if f < 3 else (2.0 * f, 0.0, 0.0),
                       (("stack", "1" if f < 3 else "2"),)) for f in range(6)]  # fmt: skip
    units, left_out = split_series("S", [_record("mf.dcm", frames, n_frames=6)])
    assert left_out == []
    assert [(u.unit_id, u.frames, u.split_by) for u in units] == [
        ("S/stack=1", {"mf.dcm": "0 1 2"}, "stack"),
        ("S/stack=2", {"mf.dcm": "3 4 5"}, "stack"),
    ]


def test_split_by_time_and_not_by_a_key_unique_per_slice():
    """AcquisitionNumber that differs per slice would leave stacks of one slice: it is
    skipped, the temporal position splits; unique positions are never split."""
    files = [_classic(f"t{t}z{z}", z, time=t, acq=10 * t + z) for t in (1, 2) for z in (0, 2, 4)]
    units, _ = split_series("S", files)
    assert [(u.unit_id, len(u.files), u.split_by) for u in units] == [
        ("S/time=1", 3, "time"), ("S/time=2", 3, "time"),
    ]  # fmt: skip
    units, _ = split_series("S", [_classic(f"z{z}", z, acq=z) for z in (0, 2, 4)])
    assert [(u.unit_id, u.split_by) for u in units] == [("S", "")]


def test_orientation_without_majority_and_localizer_series_are_left_to_fail():
    tie = [_classic("a0", 0), _classic("a1", 2), _classic("s0", 0, SAGITTAL),
           _classic("s1", 2, SAGITTAL)]  # fmt: skip
    units, left_out = split_series("S", tie)
    assert left_out == [] and [len(u.files) for u in units] == [4]
    scout = [_record("l", [SliceKey(None, AXIAL, (0, 0, 0))], image_type="ORIGINAL\\LOCALIZER")]
    units, left_out = split_series("S", scout)
    assert left_out == [] and units[0].problem.startswith("localizer series")
