"""radflow.dicom.index: classification, grouping, labels, determinism, sharding, privacy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from radflow import conventions as C
from radflow.dicom.index import (
    REASON_DICOMDIR,
    REASON_DUPLICATE,
    REASON_NO_LABEL,
    REASON_NOT_DICOM,
    REASON_TRUNCATED_HEADER,
    build_index,
    list_files,
    read_labels,
)
from radflow.lesions import EXCLUDED_LESIONS_TABLE, LESIONS_TABLE

from dicom_factory import (
    PHI_MARKER,
    assert_phi_free,
    build_export,
    new_uid,
    write_labels,
    write_projection,
)

KEY = b"radflow-test-key-0123456789abcdef"
N_SHARDS = 3
HEADER = ["AccessionNumber", "label"]


def ser(identifier: str) -> str:
    return C.pseudonym(KEY, "ser", identifier)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    info = build_export(base / "dicom")
    info["labels_csv"] = write_labels(base / "labels.csv", info["labels"], HEADER)
    return info


@pytest.fixture(scope="module")
def index(export):
    return build_index(
        export["root"], export["labels_csv"], key=KEY, n_shards=N_SHARDS, progress=False
    )


def test_hidden_files_skipped(export):
    rels = list_files(export["root"])
    assert not any(Path(r).name.startswith(".") for r in rels)
    assert "misc/report.dcm" in rels and "DICOMDIR" in rels


def test_units_and_labels(export, index):
    s = index.series.set_index(C.SERIES_PID)
    a, b, c, d = export["A"], export["B"], export["C"], export["D"]
    expected = {
        ser(a["series"]): (1, "DX", 1, a["patient"]),
        ser(b["series"]): (0, "CR", 1, b["patient"]),  # "7731" is not "007731"
        ser(c["ct_series"]): (1, "CT", 5, c["patient"]),
        ser(c["mr_series"]): (1, "MR", 4, c["patient"]),
        # a projection series with two instances: one unit per instance
        ser(f"{d['series']}/{d['sops'][0]}"): (0, "DX", 1, d["patient"]),
        ser(f"{d['series']}/{d['sops'][1]}"): (0, "DX", 1, d["patient"]),
    }
    assert sorted(s.index) == sorted(expected)
    for pid, (label, modality, n_files, patient) in expected.items():
        row = s.loc[pid]
        assert (row[C.LABEL], row[C.MODALITY], row["n_files"]) == (label, modality, n_files)
        assert row[C.PATIENT_PID] == C.pseudonym(KEY, "pat", patient)
        assert row[C.SHARD] == C.shard_of(pid, N_SHARDS)
    assert s.loc[ser(c["ct_series"]), C.STUDY_PID] == C.pseudonym(KEY, "stu", c["study"])
    assert s.loc[ser(c["ct_series"]), C.STUDY_PID] == s.loc[ser(c["mr_series"]), C.STUDY_PID]
    row = s.loc[ser(a["series"])]
    assert (row["rows"], row["columns"], row["photometric"]) == (24, 16, "MONOCHROME2")
    assert row["pixel_spacing_mm"] == "0.150\\0.100"
    assert (row["body_part"], row["view_position"], row["manufacturer"]) == (
        "CHEST", "PA", "ACME Imaging",
    )  # fmt: skip
    assert s.loc[ser(b["series"]), "pixel_spacing_mm"] == "0.200\\0.200"  # PixelSpacing first
    assert list(index.series[C.SERIES_PID]) == sorted(index.series[C.SERIES_PID])
    summary = index.summary
    assert (summary["n_units"], summary["n_patients"], summary["n_studies"]) == (6, 4, 4)
    assert (summary["n_positive"], summary["n_negative"]) == (3, 3)
    assert summary["n_label_keys_unmatched"] == 1  # "ZQXNOMATCH"
    assert summary["n_units_found"] == 9


def test_quarantine_reasons(export, index):
    root = export["root"]
    paths = index.quarantine_paths
    by_path = dict(zip(paths[C.PATH], paths[C.REASON], strict=True))

    def rel(p):
        return Path(p).relative_to(root).as_posix()

    assert by_path[rel(export["text"])] == REASON_NOT_DICOM
    assert by_path[rel(export["sr"])] == "non-image object: SR"
    assert by_path[rel(export["dicomdir"])] == REASON_DICOMDIR
    assert by_path[rel(export["truncated"])].startswith("truncated file: pixel data incomplete")
    assert by_path[rel(export["truncated_header"])] == REASON_TRUNCATED_HEADER
    assert by_path[rel(export["duplicate"])] == REASON_DUPLICATE
    assert by_path[rel(export["E"]["path"])] == REASON_NO_LABEL
    assert by_path[rel(export["F"]["path"])].startswith("missing PatientID")
    for p in export["G"]["paths"]:
        assert by_path[rel(p)] == "AccessionNumber differs between files of the unit"
    assert rel(export["hidden"]) not in by_path
    # the kept copy of the duplicate is the first path in sorted order
    dup = paths[paths[C.REASON] == REASON_DUPLICATE].iloc[0]
    assert dup[C.SERIES_PID] == ser(export["A"]["series"])
    assert dup[C.FILE_ID] == C.pseudonym(KEY, "file", rel(export["duplicate"]))

    q = index.quarantine
    assert list(q.columns) == [C.FILE_ID, C.SERIES_PID, C.REASON]
    units = q[q[C.FILE_ID] == ""].set_index(C.SERIES_PID)[C.REASON].to_dict()
    assert units == {
        ser(export["E"]["series"]): REASON_NO_LABEL,
        ser(
            export["F"]["series"]
        ): "missing PatientID (a patient-level split cannot be guaranteed)",
        ser(export["G"]["series"]): "AccessionNumber differs between files of the unit",
    }
    # files of excluded units are listed only in the private table
    assert len(q[q[C.FILE_ID] != ""]) == 6
    assert index.summary["files_quarantined"] == {
        REASON_DICOMDIR: 1,
        REASON_DUPLICATE: 1,
        "non-image object: SR": 1,
        REASON_NOT_DICOM: 1,
        REASON_TRUNCATED_HEADER: 1,
        "truncated file: pixel data incomplete": 1,
    }


def test_shard_tables(export, index):
    assert sorted(index.shard_files) == list(range(N_SHARDS))
    allrows = pd.concat(index.shard_files.values())
    assert list(allrows.columns) == [C.SERIES_PID, C.MODALITY, C.PATH, C.FRAMES, C.UNIT_KEYS]
    assert set(allrows[C.FRAMES]) == {""}  # no multi-frame file in this export
    assert set(allrows[C.UNIT_KEYS]) == {""}  # no series of this export is split
    for k, table in index.shard_files.items():
        assert all(C.shard_of(pid, N_SHARDS) == k for pid in table[C.SERIES_PID])
        assert list(table.itertuples(index=False)) == sorted(table.itertuples(index=False))
    ct = allrows[allrows[C.SERIES_PID] == ser(export["C"]["ct_series"])]
    root = export["root"]
    assert sorted(ct[C.PATH]) == sorted(
        Path(p).relative_to(root).as_posix() for p in export["C"]["ct_paths"]
    )
    assert set(allrows[C.SERIES_PID]) == set(index.series[C.SERIES_PID])


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_deterministic_and_parallel(export, index, tmp_path):
    index.write(tmp_path / "r1", tmp_path / "p1")
    again = build_index(
        export["root"], export["labels_csv"], key=KEY, n_shards=N_SHARDS, threads=2,
        progress=False,
    )  # fmt: skip
    again.write(tmp_path / "r2", tmp_path / "p2")
    assert _tree_bytes(tmp_path / "r1") == _tree_bytes(tmp_path / "r2")
    assert _tree_bytes(tmp_path / "p1") == _tree_bytes(tmp_path / "p2")
    private = sorted(_tree_bytes(tmp_path / "p1"))
    assert private == [C.SHARD_INDEX_DIR + f"/{C.shard_name(k)}.tsv" for k in range(N_SHARDS)] + [
        C.QUARANTINE_PATHS
    ]
    assert sorted(_tree_bytes(tmp_path / "r1")) == sorted(
        [C.SERIES_TABLE, C.QUARANTINE_TABLE, C.ANNOTATIONS_TABLE, C.INDEX_SUMMARY,
         LESIONS_TABLE, EXCLUDED_LESIONS_TABLE]  # written (empty) without lesion tables
    )  # fmt: skip
    series = pd.read_csv(tmp_path / "r1" / C.SERIES_TABLE, sep="\t", dtype=str)
    assert list(series.columns) == list(index.series.columns)
    assert "0.150\\0.100" in set(series["pixel_spacing_mm"])


def test_unchanged_shard_is_byte_identical(export, tmp_path):
    root = tmp_path / "dicom"
    shutil.copytree(export["root"], root)
    labels = list(export["labels"])
    write_labels(tmp_path / "l1.csv", labels, HEADER)
    first = build_index(root, tmp_path / "l1.csv", key=KEY, n_shards=N_SHARDS, progress=False)
    first.write(tmp_path / "r1", tmp_path / "p1")
    before = _tree_bytes(tmp_path / "p1" / C.SHARD_INDEX_DIR)
    # add a new labelled study whose unit lands in shard 0... or whichever shard it hashes to
    series_uid = new_uid()
    write_projection(root / "new" / "x.dcm", patient_id="ZQXPATNEW", accession="ZQXNEW1",
                     series_uid=series_uid)  # fmt: skip
    write_labels(tmp_path / "l2.csv", [*labels, ("ZQXNEW1", "1")], HEADER)
    second = build_index(root, tmp_path / "l2.csv", key=KEY, n_shards=N_SHARDS, progress=False)
    second.write(tmp_path / "r2", tmp_path / "p2")
    after = _tree_bytes(tmp_path / "p2" / C.SHARD_INDEX_DIR)
    new_shard = C.shard_name(C.shard_of(ser(series_uid), N_SHARDS)) + ".tsv"
    assert after[new_shard] != before[new_shard]
    for name in before:
        if name != new_shard:
            assert after[name] == before[name], name
    # rewriting identical content leaves the file (and its mtime) alone
    stat = (tmp_path / "p2" / C.SHARD_INDEX_DIR / new_shard).stat().st_mtime_ns
    second.write(tmp_path / "r2", tmp_path / "p2")
    assert (tmp_path / "p2" / C.SHARD_INDEX_DIR / new_shard).stat().st_mtime_ns == stat


def test_results_hold_no_phi_or_paths(export, index, tmp_path):
    index.write(tmp_path / "results", tmp_path / "private")
    rels = list_files(export["root"])
    assert_phi_free(tmp_path / "results", rels)
    # the private side does hold the paths (so the user can find the files)
    private = (tmp_path / "private" / C.QUARANTINE_PATHS).read_text()
    assert Path(export["text"]).relative_to(export["root"]).as_posix() in private
    assert PHI_MARKER.lower() not in index.summary_text().lower()
    assert "7731" not in index.summary_text()


# ---------------------------------------------------------------- labels table
def test_positive_value_mapping_and_tsv(export, tmp_path):
    rows = [(k, "malignant" if v == "1" else "benign") for k, v in export["labels"]]
    labels = write_labels(tmp_path / "labels.tsv", rows, ["AccessionNumber", "diagnosis"])
    result = build_index(
        export["root"], labels, label_column="diagnosis", positive_value="malignant",
        key=KEY, n_shards=N_SHARDS, progress=False,
    )  # fmt: skip
    s = result.series.set_index(C.SERIES_PID)[C.LABEL]
    assert s[ser(export["A"]["series"])] == 1
    assert s[ser(export["B"]["series"])] == 0


def test_label_key_study_uid(export, tmp_path):
    a, c = export["A"], export["C"]
    labels = write_labels(
        tmp_path / "l.csv", [(a["study"], "0"), (c["study"], " 1 ")], ["StudyInstanceUID", "y"]
    )
    result = build_index(
        export["root"], labels, label_key="StudyInstanceUID", label_column="y", key=KEY,
        n_shards=2, progress=False,
    )  # fmt: skip
    s = result.series.set_index(C.SERIES_PID)[C.LABEL].to_dict()
    assert s == {ser(a["series"]): 0, ser(c["ct_series"]): 1, ser(c["mr_series"]): 1}


def test_leading_zeros_and_duplicates(tmp_path):
    path = write_labels(
        tmp_path / "l.csv", [("007731", "1"), ("7731", "0"), ("007731", "1")], HEADER
    )
    assert read_labels(path, label_key="AccessionNumber", label_column="label",
                       positive_value="1") == {"007731": 1, "7731": 0}  # fmt: skip


def _error(path, **kw) -> str:
    with pytest.raises(ValueError) as err:
        read_labels(path, **{"label_key": "AccessionNumber", "label_column": "label",
                             "positive_value": "1", **kw})  # fmt: skip
    return str(err.value)


def test_conflicting_duplicates_error_names_lines_not_values(tmp_path):
    path = write_labels(
        tmp_path / "l.csv", [("ZQX0042", "1"), ("B", "0"), ("ZQX0042", "0")], HEADER
    )
    message = _error(path)
    assert "lines 2 and 4" in message and "conflicting" in message and "l.csv" in message
    assert "ZQX" not in message


def test_missing_column_error(tmp_path):
    path = write_labels(tmp_path / "l.csv", [("ZQX1", "1")], ["Accession", "label"])
    message = _error(path)
    assert "'AccessionNumber'" in message and "'Accession'" in message and "l.csv" in message
    assert "ZQX" not in message
    message = _error(path, label_key="Accession", label_column="outcome")
    assert "'outcome'" in message


def test_empty_label_and_key_errors(tmp_path):
    path = write_labels(tmp_path / "l.csv", [("ZQX1", "1"), ("ZQX2", " ")], HEADER)
    message = _error(path)
    assert "line 3" in message and "'label'" in message and "ZQX" not in message
    path = write_labels(tmp_path / "k.csv", [("ZQX1", "1"), ("", "0")], HEADER)
    assert "line 3" in _error(path)


def test_no_positive_is_an_error(tmp_path):
    path = write_labels(tmp_path / "l.csv", [("ZQX1", "yes"), ("ZQX2", "no")], HEADER)
    assert "positive value '1'" in _error(path)


def test_semicolon_csv(tmp_path):
    (tmp_path / "l.csv").write_text("AccessionNumber;label\n00012;1\n")
    assert read_labels(tmp_path / "l.csv", label_key="AccessionNumber", label_column="label",
                       positive_value="1") == {"00012": 1}  # fmt: skip


# ------------------------------------------------------------------ annotations
def test_annotations_join(export, tmp_path):
    ann = write_labels(
        tmp_path / "ann.csv",
        [
            ("007731", "3", "2.5", "5"),  # A: one 2D unit
            ("ZQXACC200", "1", "1", "4"),  # D: two units of one study, attached to each
            ("ZQXACC100", "1", "1", "4"),  # C: only 3D units
            ("007731", "24", "1", "3"),  # outside A's 24 rows
            ("ZQXNOPE", "1", "1", "3"),  # no unit
        ],
        ["AccessionNumber", C.ROW_PX, C.COL_PX, C.DIAMETER_MM],
    )
    result = build_index(
        export["root"], export["labels_csv"], annotations_table=ann, key=KEY,
        n_shards=N_SHARDS, progress=False,
    )  # fmt: skip
    a = result.annotations
    assert list(a.columns) == [C.SERIES_PID, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]
    d = export["D"]
    expected = sorted(
        [
            (ser(export["A"]["series"]), 3.0, 2.5, 5.0),
            (ser(f"{d['series']}/{d['sops'][0]}"), 1.0, 1.0, 4.0),
            (ser(f"{d['series']}/{d['sops'][1]}"), 1.0, 1.0, 4.0),
        ]
    )
    assert sorted(a.itertuples(index=False, name=None)) == expected
    assert result.summary["annotations"] == {
        "n_annotations": 5,
        "rows_written": 3,
        "unmatched": 1,
        "no_kept_2d_unit": 1,
        "outside_image": 1,
    }


def test_bad_annotation_value(export, tmp_path):
    ann = write_labels(tmp_path / "ann.csv", [("ZQX1", "x", "1", "3")],
                       ["AccessionNumber", C.ROW_PX, C.COL_PX, C.DIAMETER_MM])  # fmt: skip
    with pytest.raises(ValueError, match="'row_px' at line 2"):
        build_index(export["root"], export["labels_csv"], annotations_table=ann, key=KEY,
                    n_shards=1, progress=False)  # fmt: skip


def test_summary_json_serialisable(index):
    json.dumps(index.summary, allow_nan=False)
    assert "index:" in index.summary_text()


def test_pseudonym_collision_raises(export, monkeypatch):
    monkeypatch.setattr(C, "PSEUDONYM_HEX_CHARS", 1)  # 16 possible ids: collisions certain
    with pytest.raises(RuntimeError, match="pseudonym collision") as err:
        build_index(export["root"], export["labels_csv"], key=KEY, n_shards=1, progress=False)
    assert PHI_MARKER.lower() not in str(err.value).lower() and "/" not in str(err.value)


def test_empty_labels_table(tmp_path):
    path = write_labels(tmp_path / "l.csv", [], HEADER)
    assert "no rows" in _error(path)
