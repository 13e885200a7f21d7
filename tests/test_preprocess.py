import numpy as np
import pytest

from radflow.preprocess import (
    PreprocessSettings,
    normalize_ct,
    normalize_mr,
    normalize_xray,
    plan_grid,
    preprocess_image,
    resample,
)


def test_xray_normalisation_clips_to_percentiles():
    image = np.arange(1000, dtype=np.float32)
    out = normalize_xray(image, (1.0, 99.0))
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(image, [1, 99])
    assert out[500] == pytest.approx((500 - lo) / (hi - lo), abs=1e-6)


def test_ct_window_maps_hounsfield_units():
    out = normalize_ct(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0]), (-1000, 400))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mr_zscore_over_foreground():
    image = np.zeros((20, 20), np.float32)
    image[5:15, 5:15] = np.linspace(100, 200, 100).reshape(10, 10)
    out = normalize_mr(image, 0.05)
    fg = out[5:15, 5:15]
    assert fg.mean() == pytest.approx(0, abs=1e-5) and fg.std() == pytest.approx(1, abs=1e-3)
    assert out[0, 0] == pytest.approx(fg.min())


def test_grid_fits_physical_extent_and_keeps_aspect():
    # 100 rows x 200 cols at 0.5 x 0.25 mm: 50 mm x 50 mm -> square in a 64 x 64 grid
    mapping = plan_grid((100, 200), (0.5, 0.25), (64, 64))
    assert mapping.out_spacing_mm == pytest.approx((50 / 64, 50 / 64))
    assert mapping.scale == pytest.approx((0.5 / (50 / 64), 0.25 / (50 / 64)))
    # the image centre maps to the grid centre
    assert mapping.to_output((49.5, 99.5)) == pytest.approx((31.5, 31.5))


def test_resample_puts_a_point_where_the_mapping_says():
    image = np.zeros((300, 200), np.float32)
    image[60:66, 150:156] = 1.0  # a small bright square centred at (62.5, 152.5)
    settings = PreprocessSettings(target_shape_px=(64, 64))
    case = preprocess_image(
        image * 1000,
        (0.2, 0.2),
        "CT",
        PreprocessSettings(target_shape_px=(64, 64), ct_window_hu=(0, 1000)),
    )
    out = case.array[0].astype(np.float32)
    row, col = np.unravel_index(np.argmax(out), out.shape)
    expected = case.mapping.to_output((62.5, 152.5))
    assert abs(row - expected[0]) <= 1 and abs(col - expected[1]) <= 1
    assert settings.target_shape_px == out.shape


def test_downsampling_is_antialiased():
    checker = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)
    mapping = plan_grid(checker.shape, (1, 1), (32, 32))
    out = resample(checker, mapping, (32, 32), fill=0.0)
    # without a prefilter, point sampling of a checkerboard returns 0s and 1s
    assert np.abs(out[4:-4, 4:-4] - 0.5).max() < 0.05


def test_three_dimensional_volumes_resample_too():
    volume = np.random.default_rng(0).random((20, 40, 40)).astype(np.float32) * 100
    case = preprocess_image(
        volume, (2.5, 0.8, 0.8), "MR", PreprocessSettings(target_shape_px=(16, 32, 32))
    )
    assert case.array.shape == (1, 16, 32, 32)
    with pytest.raises(ValueError, match="target_shape_px"):
        preprocess_image(volume, (2.5, 0.8, 0.8), "MR", PreprocessSettings((32, 32)))


def test_units_of_another_dimensionality_are_skipped_with_a_reason(tmp_path):
    """A CT volume in a radiograph (2D) study is left out and listed, not fatal; so is a 4D
    unit (dcm2niix's time series), with its number of volumes; in a 3D study the CT volume
    (converted by dcm2niix) is the one kept and the radiograph is listed."""
    import pandas as pd

    from radflow import conventions as C
    from radflow.dicom.convert import convert_shard
    from radflow.preprocess import preprocess_shard

    import dicom_factory as F

    root = tmp_path / "dicom"
    F.write_projection(root / "dx.dcm", patient_id="P1", accession="A1")
    ct = F.write_volume(root / "ct", patient_id="P2", accession="A2", n_slices=4)
    times = [{"AcquisitionNumber": t, "TemporalPositionIdentifier": t} for t in (1, 2, 3)]
    mr = F.write_volumes(root / "mr", times, patient_id="P3", accession="A3", modality="MR",
                         series_uid=F.new_uid(), study_uid=F.new_uid())  # fmt: skip
    rows = [("aaaa", "DX", "dx.dcm")]
    rows += [("bbbb", "CT", p.relative_to(root).as_posix()) for p in ct]
    rows += [("cccc", "MR", p.relative_to(root).as_posix()) for v in mr for p in v]
    table = pd.DataFrame(rows, columns=[C.SERIES_PID, C.MODALITY, C.PATH])
    table.to_csv(tmp_path / "shard.tsv", sep="\t", index=False)
    converted = convert_shard(tmp_path / "shard.tsv", root, tmp_path / "nifti", progress=False)
    assert list(converted["ndim"]) == [2, 3, 4]
    assert list(converted["route"]) == ["radflow", "dcm2niix", "dcm2niix"]
    manifest = preprocess_shard(
        tmp_path / "nifti", tmp_path / "pre", PreprocessSettings((32, 32)), progress=False
    )
    assert list(manifest[C.SERIES_PID]) == ["aaaa"]
    assert np.load(tmp_path / "pre" / C.PREPROCESSED_ARRAY).shape == (1, 1, 32, 32)
    skipped = pd.read_csv(tmp_path / "pre" / C.SKIPPED_TABLE, sep="\t")
    assert list(skipped[C.SERIES_PID]) == ["bbbb", "cccc"]
    assert "3D image in a 2D study" in skipped[C.REASON].iloc[0]
    assert skipped[C.REASON].iloc[1] == (
        "4D image (3 volumes: time series, diffusion or multi-phase) in a 2D study: the task "
        "needs one 2D image per unit"
    )

    settings = PreprocessSettings((4, 16, 16), ct_window_hu=(-1000, 1000))
    manifest = preprocess_shard(tmp_path / "nifti", tmp_path / "pre3d", settings, progress=False)
    assert list(manifest[C.SERIES_PID]) == ["bbbb"]
    assert manifest["in_shape"].iloc[0] == "4\\12\\10"  # read_image: (k, j, i)
    array = np.load(tmp_path / "pre3d" / C.PREPROCESSED_ARRAY)
    assert array.shape == (1, 1, 4, 16, 16) and np.isfinite(array).all()
    skipped = pd.read_csv(tmp_path / "pre3d" / C.SKIPPED_TABLE, sep="\t")
    assert list(skipped[C.SERIES_PID]) == ["aaaa", "cccc"]
    assert "2D image in a 3D study" in skipped[C.REASON].iloc[0]
