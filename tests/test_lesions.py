"""World-mm lesion tables (LUNA16's form) joined to DICOM series by the index."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from radflow import conventions as C
from radflow.dicom.index import build_index
from radflow.lesions import EXCLUDED_LESIONS_TABLE, LESIONS_TABLE

from dicom_factory import rotation_cosines, write_labels, write_volume

KEY = b"k" * 32


def _series(root, name, **geometry):
    uid = f"1.2.826.0.1.3680043.2.1125.{abs(hash(name)) % 10**12}"
    write_volume(root / name, patient_id=name, accession=f"A-{name}", series_uid=uid,
                 n_slices=8, rows=20, cols=16, **geometry)  # fmt: skip
    return uid


def test_dicom_lesions_join_by_series_uid_with_inside_check(tmp_path):
    root = tmp_path / "dicom"
    row, col = rotation_cosines(12.0, "x")
    uids = {
        "axial": _series(root, "axial", pixel_spacing=(0.7, 0.8), slice_gap=2.0,
                         origin=(-10.0, -20.0, 30.0)),
        # feet-first: slices stacked towards the feet (normal -z)
        "feet": _series(root, "feet", row_cosines=(-1, 0, 0), col_cosines=(0, 1, 0),
                        origin=(5.0, -20.0, 40.0)),
        "oblique": _series(root, "oblique", row_cosines=row, col_cosines=col,
                           origin=(-10.0, -20.0, 30.0)),
    }  # fmt: skip
    labels = write_labels(tmp_path / "labels.csv", [(u, "1") for u in uids.values()],
                          ["SeriesInstanceUID", "label"])  # fmt: skip

    def centre(name, col_px, row_px, k):
        """World point (LPS) of voxel (col, row, slice k) of the written series."""
        geometry = {
            "axial": ((1, 0, 0), (0, 1, 0), (-10.0, -20.0, 30.0), (0.7, 0.8), 2.0),
            "feet": ((-1, 0, 0), (0, 1, 0), (5.0, -20.0, 40.0), (0.8, 0.6), 2.5),
            "oblique": (row, col, (-10.0, -20.0, 30.0), (0.8, 0.6), 2.5),
        }[name]
        r, c, origin, (row_mm, col_mm), gap = (np.asarray(g, float) if i < 3 else g
                                               for i, g in enumerate(geometry))  # fmt: skip
        normal = np.cross(r, c)
        return origin + col_px * col_mm * r + row_px * row_mm * c + k * gap * normal

    inside = {name: centre(name, 7.2, 9.6, 3.4) for name in uids}
    outside = centre("axial", 7, 9, 11.0)  # beyond the last slice
    lesion_rows = [(uids[n], *map(str, p), "6.5") for n, p in inside.items()]
    lesion_rows += [(uids["axial"], *map(str, outside), "4"), ("1.2.3.404", "0", "0", "0", "5")]
    header = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    lesions = write_labels(tmp_path / "annotations.csv", lesion_rows, header)
    excluded = write_labels(tmp_path / "excluded.csv",
                            [(uids["feet"], *map(str, inside["feet"] + 3), "-1")], header)  # fmt: skip

    result = build_index(root, labels, label_key="SeriesInstanceUID", label_column="label",
                         lesions_table=lesions, excluded_lesions_table=excluded, key=KEY,
                         n_shards=1, progress=False)  # fmt: skip
    table = result.extra[LESIONS_TABLE]
    pid_of = {C.Pseudonyms(KEY)("ser", uid): name for name, uid in uids.items()}
    assert set(table[C.SERIES_PID]) <= set(pid_of) and len(table) == 4
    for record in table.to_dict("records"):
        name = pid_of[record[C.SERIES_PID]]
        world = np.array([record["coord_x_mm"], record["coord_y_mm"], record["coord_z_mm"]])
        if record[C.DIAMETER_MM] == 4:
            assert not record["inside_image"]
        else:
            assert record["inside_image"], name
            np.testing.assert_allclose(world, inside[name])
    assert result.summary["lesions"] == {"n_lesions": 5, "unmatched": 1, "case_left_out": 0,
                                         "outside_image": 1}  # fmt: skip
    assert len(result.extra[EXCLUDED_LESIONS_TABLE]) == 1
    assert result.extra[EXCLUDED_LESIONS_TABLE][C.DIAMETER_MM].iloc[0] == -1
    # no identifier reaches the results tables
    text = pd.concat([table, result.extra[EXCLUDED_LESIONS_TABLE]]).to_csv()
    assert not any(uid in text for uid in uids.values())


def test_dicom_lesions_table_errors_name_file_line_and_column(tmp_path):
    root = tmp_path / "dicom"
    uid = _series(root, "axial")
    labels = write_labels(tmp_path / "labels.csv", [(uid, "1")], ["SeriesInstanceUID", "label"])
    bad = write_labels(tmp_path / "bad.csv", [(uid, "1", "x", "3", "5")],
                       ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])  # fmt: skip
    with pytest.raises(ValueError, match=r"bad.csv: line 2: column coordY holds 'x'"):
        build_index(root, labels, label_key="SeriesInstanceUID", lesions_table=bad, key=KEY,
                    n_shards=1, progress=False)  # fmt: skip
    missing = write_labels(tmp_path / "missing.csv", [(uid, "1", "2", "3")],
                           ["seriesuid", "coordX", "coordY", "coordZ"])  # fmt: skip
    with pytest.raises(ValueError, match=r"missing.csv.*diameter_mm"):
        build_index(root, labels, label_key="SeriesInstanceUID", lesions_table=missing, key=KEY,
                    n_shards=1, progress=False)  # fmt: skip


def test_without_a_labels_table_a_series_is_labelled_by_its_lesions(tmp_path):
    root = tmp_path / "dicom"
    with_lesion, without = _series(root, "a"), _series(root, "b")
    lesions = write_labels(tmp_path / "annotations.csv", [(with_lesion, "-5", "-10", "35", "6")],
                           ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])  # fmt: skip
    result = build_index(root, None, label_key="SeriesInstanceUID", lesions_table=lesions,
                         key=KEY, n_shards=1, progress=False)  # fmt: skip
    pseudo = C.Pseudonyms(KEY)
    label_of = dict(zip(result.series[C.SERIES_PID], result.series[C.LABEL], strict=True))
    assert label_of == {pseudo("ser", with_lesion): 1, pseudo("ser", without): 0}
    with pytest.raises(ValueError, match="set data.label_key to SeriesInstanceUID"):
        build_index(root, None, label_key="AccessionNumber", lesions_table=lesions, key=KEY,
                    n_shards=1, progress=False)  # fmt: skip
