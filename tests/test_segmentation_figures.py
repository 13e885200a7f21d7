"""radflow.tasks.segmentation.figures: case choice, lesion-centred planes in radiological
orientation on an anisotropic sagittal acquisition, valid PNGs, NaN-tolerant strips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from radflow.tasks.segmentation import figures as SF

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A sagittal-like acquisition: voxel i runs posterior (1 mm), j inferior (1 mm), k to the
# patient's right (4 mm slices): axis codes "PIR", native shape (i, j, k).
NATIVE_SHAPE = (40, 30, 12)
SAGITTAL_AFFINE = np.array(
    [
        [0.0, 0.0, 4.0, -20.0],
        [-1.0, 0.0, 0.0, 25.0],
        [0.0, -1.0, 0.0, 15.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
BIG = (slice(5, 11), slice(4, 9), slice(8, 11))  # 6 x 5 x 3 voxels, off centre
SMALL = (slice(30, 32), slice(22, 24), slice(1, 2))  # 2 x 2 x 1 voxels, apart


def _labels() -> np.ndarray:
    labels = np.zeros(NATIVE_SHAPE, np.uint8)
    labels[BIG] = 2
    labels[BIG[0], BIG[1], slice(9, 10)] = 4  # a second label inside: still one lesion
    labels[SMALL] = 1
    return labels


def _canonical_index(native_ijk) -> np.ndarray:
    """Where a native voxel lands on nibabel's closest canonical grid (independently of
    the module: through world coordinates and as_closest_canonical's affine)."""
    canonical = nib.as_closest_canonical(
        nib.Nifti1Image(np.zeros(NATIVE_SHAPE, np.uint8), SAGITTAL_AFFINE)
    )
    world = SAGITTAL_AFFINE @ np.append(np.asarray(native_ijk, float), 1.0)
    return np.linalg.solve(canonical.affine, world)[:3]


def _write(path, data, affine=SAGITTAL_AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def case_files(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(100.0, 10.0, (*NATIVE_SHAPE, 2)).astype(np.float32)  # 2 channels
    image[BIG] += 80.0
    prediction = np.zeros(NATIVE_SHAPE, np.uint8)
    prediction[6:12, 4:9, 8:11] = 1  # shifted by one voxel
    empty = np.zeros(NATIVE_SHAPE, np.uint8)
    return {
        "image": _write(tmp_path / "image.nii.gz", image),
        "reference": _write(tmp_path / "reference.nii.gz", _labels()),
        "prediction": _write(tmp_path / "prediction.nii.gz", prediction),
        "empty": _write(tmp_path / "empty.nii.gz", empty),
    }


# ------------------------------------------------------------------ select_cases
def _per_case(pids, values, region="whole_tumour", metric="dice"):
    return pd.DataFrame({"series_pid": pids, "region": region, metric: values})


def test_select_cases_best_median_worst_by_region():
    table = pd.concat(
        [
            _per_case(["a", "b", "c", "d", "e"], [0.5, 0.9, 0.7, 0.1, 0.8]),
            _per_case(["a", "b", "c", "d", "e"], [0.9, 0.1, 0.5, 0.7, 0.3], "tumour_core"),
        ]
    )
    assert SF.select_cases(table, region="whole_tumour") == {
        "best": "b",
        "median": "c",
        "worst": "d",
    }
    assert SF.select_cases(table, region="tumour_core") == {
        "best": "a",
        "median": "c",
        "worst": "b",
    }


def test_select_cases_lower_is_better_ties_and_nan():
    table = _per_case(["p3", "p1", "p2", "p4", "p5"], [2.0, 2.0, np.nan, 9.0, 9.0], "wt", "hd95_mm")
    # p2 (undefined) is out; ties go to the smaller series_pid at both ends; ranking
    # best to worst p1, p3, p4, p5, so the lower median (position (4 - 1) // 2) is p3
    chosen = SF.select_cases(table, region="wt", metric="hd95_mm")
    assert chosen == {"best": "p1", "median": "p3", "worst": "p4"}
    flipped = SF.select_cases(table, region="wt", metric="hd95_mm", higher_is_better=True)
    assert flipped["best"] == "p4" and flipped["worst"] == "p1"


def test_select_cases_few_cases_and_errors():
    assert SF.select_cases(_per_case(["x"], [0.4]), region="whole_tumour") == dict.fromkeys(
        ("best", "median", "worst"), "x"
    )
    two = SF.select_cases(_per_case(["x", "y"], [0.4, 0.6]), region="whole_tumour")
    assert two == {"best": "y", "median": "y", "worst": "x"}
    with pytest.raises(ValueError, match="no case"):
        SF.select_cases(_per_case(["x"], [np.nan]), region="whole_tumour")
    with pytest.raises(ValueError, match="twice"):
        SF.select_cases(_per_case(["x", "x"], [0.1, 0.2]), region="whole_tumour")
    with pytest.raises(ValueError, match="lacks column"):
        SF.select_cases(_per_case(["x"], [0.1]), region="whole_tumour", metric="nsd")


# ------------------------------------------------------------ geometry of planes
def test_load_canonical_matches_nibabel(case_files):
    data, affine = SF.load_canonical(case_files["image"], channel=1)
    expected = nib.as_closest_canonical(nib.load(str(case_files["image"]))).get_fdata()[..., 1]
    np.testing.assert_array_equal(data, expected)
    assert data.shape == (12, 40, 30)  # (R, A, S): k, i, j of the sagittal acquisition
    with pytest.raises(ValueError, match="channel"):
        SF.load_canonical(case_files["image"], channel=2)


def test_lesion_centre_is_largest_component_in_canonical_space(case_files):
    reference, _ = SF.load_canonical(case_files["reference"])
    prediction, _ = SF.load_canonical(case_files["prediction"])
    centre = SF.lesion_centre(reference, prediction)
    big_centroid = [np.mean([s.start, s.stop - 1]) for s in BIG]
    np.testing.assert_allclose(centre, np.round(_canonical_index(big_centroid)), atol=0.51)
    assert reference[centre] > 0  # the big lesion is a box: its centroid is inside
    # every displayed plane cuts the lesion
    spacing = (4.0, 1.0, 1.0)
    for plane in SF.display_planes(reference, centre, spacing):
        assert (plane.pixels > 0).any(), plane.name


def test_lesion_centre_fallbacks():
    empty = np.zeros((9, 10, 11), np.uint8)
    prediction = empty.copy()
    prediction[1:3, 2:4, 7:9] = 3
    assert SF.lesion_centre(empty, prediction) == (2, 3, 8)  # centroid 1.5, 2.5, 7.5 rounded up
    assert SF.lesion_centre(empty, empty) == (4, 5, 5)
    with pytest.raises(ValueError, match="one shape"):
        SF.lesion_centre(empty, empty[:-1])


def test_display_planes_radiological_orientation_and_aspect():
    volume = np.zeros((10, 20, 30))  # canonical RAS+: i left->right, j post->ant, k inf->sup
    volume[8, 17, 25] = 1.0  # the patient's right, anterior, superior
    axial, coronal, sagittal = SF.display_planes(volume, (8, 17, 25), (1.0, 2.0, 4.0))
    for plane, shape in ((axial, (20, 10)), (coronal, (30, 10)), (sagittal, (30, 20))):
        assert plane.pixels.shape == shape
        row, col = np.argwhere(plane.pixels)[0]
        assert row < shape[0] / 2  # anterior (axial) / superior (others): top half
        assert col < shape[1] / 2  # right (axial, coronal) / anterior (sagittal): left half
    assert (axial.left, axial.top, coronal.top, sagittal.left) == ("R", "A", "S", "A")
    assert (axial.aspect, coronal.aspect, sagittal.aspect) == (2.0, 4.0, 2.0)


# --------------------------------------------------------------------- figures
def test_overlay_montage_png_and_panels(case_files, tmp_path):
    cases = [
        SF.MontageCase(
            "best: WT Dice 0.93", *(case_files[k] for k in ("image", "reference", "prediction"))
        ),
        SF.MontageCase("empty case", case_files["image"], case_files["empty"], case_files["empty"]),
    ]
    out = tmp_path / "figs" / "montage.png"
    fig = SF.plot_overlay_montage(cases, out, channel=1, title="Whole tumour")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000
    assert len(fig.axes) == 6  # 2 rows x (axial, coronal, sagittal)
    assert [sub.get_suptitle() for sub in fig.subfigs] == ["best: WT Dice 0.93", "empty case"]
    lesion_row, empty_row = fig.axes[:3], fig.axes[3:]
    assert all(len(ax.collections) == 2 for ax in lesion_row)  # both outlines in every plane
    assert all(len(ax.collections) == 0 for ax in empty_row)
    # the 4 mm slices: coronal (S x R) and axial (A x R) pixels are 4 times narrower
    assert lesion_row[1].get_aspect() == pytest.approx(0.25)
    assert lesion_row[2].get_aspect() == pytest.approx(1.0)
    assert not list(tmp_path.glob("figs/.*.tmp"))


def test_overlay_montage_rejects_other_grid(case_files, tmp_path):
    other = np.array(SAGITTAL_AFFINE)
    other[0, 3] += 10.0
    moved = _write(tmp_path / "moved.nii.gz", _labels(), other)
    case = SF.MontageCase("x", case_files["image"], moved, case_files["prediction"])
    with pytest.raises(ValueError, match="voxel grid"):
        SF.plot_overlay_montage([case], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_metric_strips_nan_and_summary(tmp_path):
    per_case = pd.DataFrame(
        {
            "series_pid": ["a", "b", "c"] * 2,
            "region": ["whole_tumour"] * 3 + ["enhancing_tumour"] * 3,
            "dice": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            "hd95_mm": [2.0, np.nan, 4.0, np.nan, np.nan, np.nan],
            "nsd": [0.95, 0.9, 0.85, 0.7, 0.6, 0.5],
        }
    )
    summary = pd.DataFrame(
        {
            "region": ["whole_tumour"],
            "metric": ["dice"],
            "mean": [0.8],
            "ci_low": [0.7],
            "ci_high": [0.9],
        }
    )
    out = tmp_path / "strips.png"
    fig = SF.plot_metric_strips(per_case, out, summary=summary)
    assert out.read_bytes()[:8] == PNG_MAGIC
    dice_ax, hd_ax, nsd_ax = fig.axes
    assert [t.get_text() for t in hd_ax.get_xticklabels()] == [
        "whole_tumour\n(n = 2)",
        "enhancing_tumour\n(n = 0)",
    ]
    assert (dice_ax.get_ylabel(), hd_ax.get_ylabel(), nsd_ax.get_ylabel()) == (
        "Dice (fraction)",
        "HD95 (mm)",
        "surface Dice (fraction)",
    )
    assert len(dice_ax.containers) == 1 and not hd_ax.containers  # CI only where given
    points = hd_ax.lines[0].get_ydata()
    np.testing.assert_array_equal(points, [2.0, 4.0])
    again = SF.plot_metric_strips(per_case, tmp_path / "again.png", summary=summary)
    np.testing.assert_array_equal(again.axes[0].lines[0].get_xdata(), dice_ax.lines[0].get_xdata())
    with pytest.raises(ValueError, match="lacks"):
        SF.plot_metric_strips(per_case, tmp_path / "x.png", metrics=("lesion_f1",))
