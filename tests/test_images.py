"""Images-table input (radflow.images): index, quarantine, conversion with channels and
masks, geometry against SimpleITK's own NIfTI writer, planar formats, and real BraTS and
MedMNIST files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from radflow import conventions as C
from radflow.dicom.nifti import read_channels
from radflow.images import TableColumns, build_table_index, convert_table_shard, read_info
from radflow.preprocess import PreprocessSettings, preprocess_shard

KEY = b"k" * 32
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _volume(shape_zyx, spacing, origin, direction, seed, dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(0, 1000, shape_zyx).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


OBLIQUE = tuple(
    np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]).ravel()
)


def _write_table(folder: Path, rows: list[dict], name="images.csv") -> Path:
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _index_and_convert(table: Path, tmp: Path, **kwargs):
    result = build_table_index(table, key=KEY, n_shards=1, progress=False, **kwargs)
    result.write(tmp / "results", tmp / "private")
    shard = tmp / "private" / C.SHARD_INDEX_DIR / f"{C.shard_name(0)}.tsv"
    manifest = convert_table_shard(shard, table.parent, tmp / "nifti", progress=False)
    return result, manifest


@pytest.fixture
def two_channel_cohort(tmp_path):
    """Three MR cases with flair (reference) and t1c on another grid, and masks; a fourth
    case misses t1c; a fifth has a mask on the wrong grid; a sixth names a missing file; a
    seventh has an unreadable file."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(7):
        patient = f"John^Doe{i}"  # an identifier that must never reach results/
        flair = _volume((12, 20, 16), (1.0, 1.0, 3.0), (-10.0 * i, 5.0, 30.0), OBLIQUE, i)
        t1c = _volume((24, 20, 16), (1.0, 1.0, 1.5), (-10.0 * i, 5.0, 30.0), OBLIQUE, 10 + i)
        sitk.WriteImage(flair, str(data / f"{patient}_flair.nii.gz"))
        sitk.WriteImage(t1c, str(data / f"{patient}_t1c.mha"))
        mask_ref = flair if i != 4 else t1c  # case 4: mask on the t1c grid
        mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(mask_ref) > 800).astype(np.uint8) * 2)
        mask.CopyInformation(mask_ref)
        sitk.WriteImage(mask, str(data / f"{patient}_seg.nrrd"))
        label = str(i % 2)
        rows.append(dict(patient_id=patient, case_id=f"case{i}", channel="flair",
                         path=f"data/{patient}_flair.nii.gz", label=label,
                         mask=f"data/{patient}_seg.nrrd"))  # fmt: skip
        if i != 3:  # case 3 misses its t1c
            t1c_path = f"data/{patient}_t1c.mha" if i != 5 else "data/nowhere.mha"
            rows.append(dict(patient_id=patient, case_id=f"case{i}", channel="t1c",
                             path=t1c_path, label=label, mask=""))  # fmt: skip
    (data / "John^Doe6_t1c.mha").write_bytes(b"not an image at all")
    return _write_table(tmp_path, rows), data


def test_channels_masks_and_quarantine(two_channel_cohort, tmp_path):
    table, data = two_channel_cohort
    result, manifest = _index_and_convert(table, tmp_path, columns=TableColumns(),
                                          modality="MR")  # fmt: skip
    assert len(result.series) == 3  # cases 0, 1, 2
    assert result.summary["channels"] == ["flair", "t1c"]
    q = result.quarantine
    reasons = " | ".join(q[C.REASON])
    assert "missing channel t1c" in reasons  # case 3
    assert "mask grid differs from its image's" in reasons  # case 4
    assert "file not found" in reasons  # case 5
    assert "unreadable image" in reasons  # case 6
    # nothing identifying under results/: no patient names, no paths, no case ids
    secrets = ["John", "Doe", *(f"case{i}" for i in range(7)), "_flair", "_t1c", "_seg", "data/"]
    for path in (tmp_path / "results").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not [s for s in secrets if s in text], (path, text)
    private = (tmp_path / "private" / C.QUARANTINE_PATHS).read_text()
    assert "data/nowhere.mha" in private  # the user can find the files in the private table
    assert (manifest[C.STATUS] == C.STATUS_OK).all()

    # converted: 2 channels on the flair grid, flair voxels exact, mask exact labels
    pid = result.series[C.SERIES_PID].iloc[0]
    case = next(f"case{i}" for i in range(3) if C.pseudonym(KEY, "ser", f"case{i}") == pid)
    patient = f"John^Doe{case[-1]}"
    out = nib.load(tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
    assert out.shape == (16, 20, 12, 2)
    sitk_nifti = tmp_path / "sitk_flair.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(data / f"{patient}_flair.nii.gz")), str(sitk_nifti))
    reference = nib.load(sitk_nifti)
    np.testing.assert_allclose(out.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj)[..., 0], np.asarray(reference.dataobj))
    t1c_on_flair = sitk.Resample(
        sitk.Cast(sitk.ReadImage(str(data / f"{patient}_t1c.mha")), sitk.sitkFloat32),
        sitk.ReadImage(str(data / f"{patient}_flair.nii.gz")), sitk.Transform(), sitk.sitkLinear,
    )  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(out.dataobj)[..., 1], sitk.GetArrayFromImage(t1c_on_flair).T, atol=1e-3
    )
    mask = nib.load(tmp_path / "nifti" / f"{pid}{C.MASK_SUFFIX}")
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(data / f"{patient}_flair.nii.gz"))) > 800
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.T.astype(np.uint8) * 2)
    sidecar = json.loads((tmp_path / "nifti" / f"{pid}.json").read_text())
    assert sidecar["channels"] == ["flair", "t1c"] and sidecar["channels_resampled"] == ["t1c"]
    assert sidecar["has_mask"] is True
    assert "John" not in json.dumps(sidecar)
    header = nib.load(tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}").header
    assert b"John" not in header.binaryblock

    # preprocess: both channels, each normalised on its own, on one grid
    settings = PreprocessSettings(target_shape_px=(8, 8, 8))
    pre = preprocess_shard(tmp_path / "nifti", tmp_path / "pre", settings, progress=False)
    images = np.load(tmp_path / "pre" / C.PREPROCESSED_ARRAY)
    assert images.shape == (3, 2, 8, 8, 8) and len(pre) == 3
    channels, _ = read_channels(tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
    assert channels.shape == (2, 12, 20, 16)


def test_reference_channel_is_configurable(two_channel_cohort, tmp_path):
    table, _ = two_channel_cohort
    result, manifest = _index_and_convert(table, tmp_path, reference_channel="t1c",
                                          modality="MR")  # fmt: skip
    assert result.summary["channels"] == ["t1c", "flair"]
    ok = manifest[manifest[C.STATUS] == C.STATUS_OK]
    # with t1c as the reference, the flair-grid masks no longer share the image's grid
    assert "mask grid differs" in " ".join(result.quarantine[C.REASON])
    assert len(ok) == 1, result.quarantine[C.REASON].tolist()  # case 4: mask on the t1c grid
    out = nib.load(tmp_path / "nifti" / f"{ok[C.SERIES_PID].iloc[0]}{C.NIFTI_SUFFIX}")
    assert out.shape == (16, 20, 24, 2)
    with pytest.raises(ValueError, match="reference_channel 'pd' is not a channel"):
        build_table_index(table, key=KEY, n_shards=1, reference_channel="pd", progress=False)


def test_planar_formats(tmp_path):
    """8-bit and 16-bit PNG (kept 16-bit), JPEG, TIFF, grey stored as RGB, colour as luma."""
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65535, (30, 40), dtype=np.uint16)
    gray8 = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    Image.fromarray(gray16).save(tmp_path / "a16.png")
    Image.fromarray(gray8).save(tmp_path / "b8.png")
    Image.fromarray(np.stack([gray8] * 3, -1)).save(tmp_path / "c_rgb_grey.png")
    colour = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "d_colour.png")
    Image.fromarray(gray8).save(tmp_path / "e.jpg", quality=95)
    Image.fromarray(gray16).save(tmp_path / "f16.tif")
    names = ["a16.png", "b8.png", "c_rgb_grey.png", "d_colour.png", "e.jpg", "f16.tif"]
    rows = [dict(patient_id=f"p{i}", path=n, label=str(i % 2)) for i, n in enumerate(names)]
    table = _write_table(tmp_path, rows)
    assert read_info(str(tmp_path / "a16.png")).size == (40, 30)
    result, manifest = _index_and_convert(table, tmp_path, modality="DX")
    assert (manifest[C.STATUS] == C.STATUS_OK).all(), manifest[C.REASON].tolist()
    by_name = {C.pseudonym(KEY, "ser", f"p{i}\0{n}"): n for i, n in enumerate(names)}

    def pixels(name):
        pid = next(p for p, n in by_name.items() if n == name)
        image = nib.load(tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
        return np.asarray(image.dataobj)[:, :, 0].T, image.get_data_dtype(), pid

    data, dtype, _ = pixels("a16.png")
    assert dtype == np.uint16
    np.testing.assert_array_equal(data, gray16)
    np.testing.assert_array_equal(pixels("b8.png")[0], gray8)
    np.testing.assert_array_equal(pixels("c_rgb_grey.png")[0], gray8)
    data, _, pid = pixels("d_colour.png")
    np.testing.assert_allclose(data, colour @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    sidecar = json.loads((tmp_path / "nifti" / f"{pid}.json").read_text())
    assert sidecar["colour_to_grey"] == "ITU-R BT.601 luma"
    assert np.abs(pixels("e.jpg")[0].astype(int) - gray8).mean() < 3
    np.testing.assert_array_equal(pixels("f16.tif")[0], gray16)
    # preprocess treats them as the 2D study images they are
    pre = preprocess_shard(tmp_path / "nifti", tmp_path / "pre",
                           PreprocessSettings(target_shape_px=(16, 16)), progress=False)  # fmt: skip
    assert len(pre) == len(names)
    assert np.load(tmp_path / "pre" / C.PREPROCESSED_ARRAY).shape == (len(names), 1, 16, 16)


def test_table_errors_name_file_column_and_line(tmp_path):
    table = _write_table(tmp_path, [dict(patient_id="a", path="x.png", label="1"),
                                    dict(patient_id="", path="y.png", label="0")])  # fmt: skip
    with pytest.raises(ValueError, match=r"images.csv: empty 'patient_id' at line 3"):
        build_table_index(table, key=KEY, n_shards=1, progress=False)
    table = _write_table(tmp_path, [dict(patient="a", file="x.png", label="1")])
    with pytest.raises(ValueError, match=r"no column 'patient_id'"):
        build_table_index(table, key=KEY, n_shards=1, progress=False)
    # an unsupported format is quarantined with what to use instead
    (tmp_path / "x.dcm").write_bytes(b"\0" * 200)
    table = _write_table(tmp_path, [dict(patient_id="a", path="x.dcm", label="1")])
    result = build_table_index(table, key=KEY, n_shards=1, progress=False)
    assert result.series.empty
    assert "unsupported image format (use one of .nii.gz" in " ".join(result.quarantine[C.REASON])


def test_convert_failure_is_listed_not_fatal(tmp_path):
    """A file whose header reads but whose voxels are truncated fails its case only."""
    good = _volume((4, 6, 5), (1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel()), 1)
    sitk.WriteImage(good, str(tmp_path / "good.nii.gz"))
    sitk.WriteImage(good, str(tmp_path / "bad.nii"))
    raw = (tmp_path / "bad.nii").read_bytes()
    (tmp_path / "bad.nii").write_bytes(raw[: 352 + 40])
    table = _write_table(tmp_path, [dict(patient_id="a", path="good.nii.gz", label="1"),
                                    dict(patient_id="b", path="bad.nii", label="0")])  # fmt: skip
    _, manifest = _index_and_convert(table, tmp_path)
    assert sorted(manifest[C.STATUS]) == [C.STATUS_FAILED, C.STATUS_OK]
    reason = manifest.loc[manifest[C.STATUS] == C.STATUS_FAILED, C.REASON].iloc[0]
    assert "bad.nii" not in reason and str(tmp_path) not in reason


@pytest.mark.skipif(not (SHARED / "brats2015").is_dir(), reason="../shared/data absent")
def test_real_brats_case_through_an_images_table(tmp_path):
    """A real BraTS case: FLAIR + T1c channels and the expert label map keep their
    geometry and every label voxel."""
    case = SHARED / "brats2015" / "brats_2013_pat0001_1"
    rows = [
        dict(patient_id="pat0001", case_id="c1", channel="flair",
             path=str(case / "Flair_subtrMeanDivStd.nii.gz"), label="1",
             mask=str(case / "OTMultiClass.nii.gz")),
        dict(patient_id="pat0001", case_id="c1", channel="t1c",
             path=str(case / "T1c_subtrMeanDivStd.nii.gz"), label="1", mask=""),
    ]  # fmt: skip
    table = _write_table(tmp_path, rows)
    result, manifest = _index_and_convert(table, tmp_path, modality="MR")
    assert (manifest[C.STATUS] == C.STATUS_OK).all(), manifest[C.REASON].tolist()
    pid = result.series[C.SERIES_PID].iloc[0]
    out = nib.load(tmp_path / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
    source = nib.load(case / "Flair_subtrMeanDivStd.nii.gz")
    assert out.shape == (*source.shape, 2)
    sitk_copy = tmp_path / "flair_sitk.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(case / "Flair_subtrMeanDivStd.nii.gz")), str(sitk_copy))
    np.testing.assert_allclose(out.affine, nib.load(sitk_copy).affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.dataobj)[..., 0], source.get_fdata(), atol=1e-5)
    mask = np.asarray(nib.load(tmp_path / "nifti" / f"{pid}{C.MASK_SUFFIX}").dataobj)
    labels = np.asarray(nib.load(case / "OTMultiClass.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, labels)
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4} and (mask == 4).sum() > 0


@pytest.mark.skipif(not (SHARED / "medmnist3d").is_dir(), reason="../shared/data absent")
def test_medmnist_converter_on_the_official_file(tmp_path):
    from radflow.medmnist import convert_npz

    npz = SHARED / "medmnist3d" / "adrenalmnist3d.npz"
    table = convert_npz(npz, tmp_path / "adrenal")
    official = np.load(npz)
    assert len(table) == 1188 + 98 + 298
    split = pd.read_csv(tmp_path / "adrenal" / "split.tsv", sep="\t")
    assert split["split"].value_counts().to_dict() == {"train": 1188, "test": 298, "val": 98}
    first_test = table[table["patient_id"] == "test_00000"].iloc[0]
    image = nib.load(tmp_path / "adrenal" / first_test["path"])
    np.testing.assert_array_equal(np.asarray(image.dataobj).T, official["test_images"][0])
    assert int(first_test["label"]) == int(official["test_labels"][0, 0])
    assert pd.read_csv(tmp_path / "adrenal" / "images.tsv", sep="\t")["label"].sum() == int(
        sum(official[f"{s}_labels"].sum() for s in ("train", "val", "test"))
    )
    with gzip.open(tmp_path / "adrenal" / first_test["path"]) as fh:
        assert len(fh.read()) > 28**3


def test_lesions_table_in_world_coordinates(tmp_path):
    """Lesion centres in world mm (LPS, as LUNA16) join their case by pseudonym; the
    world-to-voxel mapping agrees with ITK's on an oblique, offset volume."""
    from radflow.images import LESIONS_TABLE, world_to_index

    image = _volume((10, 30, 20), (0.7, 0.8, 2.5), (-120.0, 35.5, -300.0), OBLIQUE, 3)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    table = _write_table(tmp_path, [dict(patient_id="P1", case_id="scan1", path="ct.nii.gz",
                                         label="1")])  # fmt: skip
    inside = image.TransformContinuousIndexToPhysicalPoint((12.3, 20.7, 4.2))
    outside = image.TransformContinuousIndexToPhysicalPoint((-5.0, 20.0, 4.0))
    lesions = tmp_path / "lesions.csv"
    pd.DataFrame(
        [dict(case_id="scan1", coordX=inside[0], coordY=inside[1], coordZ=inside[2],
              diameter_mm=6.0),
         dict(case_id="scan1", coordX=outside[0], coordY=outside[1], coordZ=outside[2],
              diameter_mm=4.0),
         dict(case_id="elsewhere", coordX=0, coordY=0, coordZ=0, diameter_mm=5.0)]
    ).to_csv(lesions, index=False)  # fmt: skip
    result = build_table_index(table, key=KEY, n_shards=1, lesions_table=lesions,
                               progress=False)  # fmt: skip
    found = result.extra[LESIONS_TABLE]
    assert len(found) == 2 and set(found[C.SERIES_PID]) == set(result.series[C.SERIES_PID])
    assert sorted(found["inside_image"]) == [False, True]
    assert result.summary["lesions"] == {"n_lesions": 3, "unmatched": 1, "case_left_out": 0,
                                         "outside_image": 1}  # fmt: skip
    info = read_info(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(world_to_index(info, inside), (12.3, 20.7, 4.2), atol=1e-4)
    result.write(tmp_path / "results", tmp_path / "private")
    written = pd.read_csv(tmp_path / "results" / LESIONS_TABLE, sep="\t")
    assert "scan1" not in written.to_csv()
    bad = tmp_path / "bad.csv"
    pd.DataFrame([dict(case_id="scan1", coordX="left", coordY=0, coordZ=0,
                       diameter_mm=1)]).to_csv(bad, index=False)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"bad.csv: line 2: column coordX holds .left., not a number"
    ):
        build_table_index(table, key=KEY, n_shards=1, lesions_table=bad, progress=False)
