"""The lung-nodule demo's cohort: chest CT as real DICOM in HU, LUNA16-form annotations in
world mm that land on the nodules however the series is oriented, labels that headers
cannot give away."""

import csv
from collections import defaultdict

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from radflow.config import ConfigError, check_config
from radflow.synth import chest, chest_phantom
from radflow.synth.chest import (
    ANNOTATION_COLUMNS,
    CT_IMAGE_STORAGE,
    SERIES_COLUMNS,
    ChestCohortSpec,
    synthesize_chest_cohort,
)
from radflow.synth.export import GIVEN_NAMES, INSTITUTIONS, SURNAMES

from synth_cohort import tree_digest

# scale 4: 128 x 128 slices of 2.4-3.6 mm, 2.5-10 mm thick; large nodules so that each
# is several voxels across; the seed gives every setup a nodule
N_PATIENTS, SEED, SCALE = 3, 3, 4.0
OPTIONS = dict(scale=SCALE, nodule_diameter_mm=(12.0, 30.0), slab_mm=160, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("chest")
    synthesize_chest_cohort(root, N_PATIENTS, SEED, workers=2, **OPTIONS)
    return root


def _table(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _ct_files(root):
    """{SeriesInstanceUID: [(path, header), ...]} of the CT image files."""
    found = defaultdict(list)
    for path in sorted((root / "dicom").rglob("*")):
        if path.is_file() and path.suffix != ".txt":
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if header.Modality == "CT":
                found[header.SeriesInstanceUID].append((path, header))
    return found


def _setup(header) -> str:
    iop = np.array(header.ImageOrientationPatient, float)
    if abs(abs(np.cross(iop[:3], iop[3:])[2]) - 1) > 1e-6:
        return "oblique"
    return header.PatientPosition


def test_headers_are_ct_in_hounsfield_units_with_phi_and_chest_geometry(cohort):
    series = _ct_files(cohort)
    assert len(series) == N_PATIENTS
    for items in series.values():
        for _, h in items:
            assert h.SOPClassUID == CT_IMAGE_STORAGE and h.Modality == "CT"
            assert h.BodyPartExamined == "CHEST"
            assert float(h.RescaleIntercept) == -1024 and float(h.RescaleSlope) == 1
            assert 0.6 * SCALE <= float(h.PixelSpacing[0]) <= 0.9 * SCALE
            assert 0.625 * SCALE <= float(h.SliceThickness) <= 2.5 * SCALE
            assert h.PatientName.family_name in SURNAMES
            assert h.PatientName.given_name in GIVEN_NAMES
            assert len(h.PatientID) == 10 and len(h.PatientBirthDate) == 8
            assert h.InstitutionName in INSTITUTIONS and h.AccessionNumber.startswith("ACC")
        fov = float(items[0][1].PixelSpacing[0]) * items[0][1].Columns
        assert 300 <= fov <= 400
        thickness = float(items[0][1].SliceThickness)
        assert len(items) * float(items[0][1].SpacingBetweenSlices) == pytest.approx(160, abs=5)
        assert thickness >= float(items[0][1].SpacingBetweenSlices)
    assert {_setup(items[0][1]) for items in series.values()} == {"HFS", "FFS", "oblique"}


def test_feet_first_positions_stay_in_the_patient_frame(cohort):
    for items in _ct_files(cohort).values():
        h = items[0][1]
        if h.PatientPosition != "FFS" or _setup(h) == "oblique":
            continue
        by_instance = sorted(items, key=lambda t: int(t[1].InstanceNumber))
        z = [float(t[1].ImagePositionPatient[2]) for t in by_instance]
        assert np.all(np.diff(z) < 0) or np.all(np.diff(z) > 0)  # one sweep along +-z
        row = float(h.ImageOrientationPatient[0])
        assert row in (1.0, -1.0)  # gantry view (patient right) or display view


def test_same_seed_writes_identical_files_whatever_the_worker_count(cohort, tmp_path):
    synthesize_chest_cohort(tmp_path / "again", N_PATIENTS, SEED, workers=1, **OPTIONS)
    assert tree_digest(tmp_path / "again") == tree_digest(cohort)


def test_annotations_land_on_nodules_in_every_setup(cohort):
    rows = _table(cohort / "annotations.csv")
    assert rows[0] == ANNOTATION_COLUMNS
    by_series = defaultdict(list)
    for uid, *xyz, diameter in rows[1:]:
        by_series[uid].append((tuple(map(float, xyz)), float(diameter)))
    checked = set()
    reader = sitk.ImageSeriesReader()
    for series_uid, items in _ct_files(cohort).items():
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(items[0][0].parent), series_uid))
        image = reader.Execute()
        hu = sitk.GetArrayFromImage(image)
        lung = np.median(hu[hu.shape[0] // 2][hu[hu.shape[0] // 2] < -600])
        for centre, diameter in by_series[series_uid]:
            assert 12 <= diameter <= 30
            i, j, k = image.TransformPhysicalPointToIndex(centre)
            assert hu[k, j, i] > -600 and hu[k, j, i] > lung + 250, (centre, hu[k, j, i])
            checked.add(_setup(items[0][1]))
    assert checked == {"HFS", "FFS", "oblique"}


def test_nodules_lie_inside_the_lungs_and_diameters_skew_small():
    spec = ChestCohortSpec(n_patients=40, seed=5, scale=SCALE, slab_mm=160)
    inside, diameters = [], []
    for p, setup in enumerate(chest.acquisition_setups(spec)[:40]):
        th = chest_phantom.sample_thorax(chest._stream(spec, p, "anatomy"))
        plan = chest.plan_series(spec, p, setup, th)
        nodules, excluded = chest.draw_findings(spec, p, th, plan.geometry)
        for n in nodules:
            depth, _ = chest_phantom.lung_depth_mm(th, *(np.array(n.centre_lps) - th.centre_lps))
            inside.append(float(depth) > 0)
            diameters.append(n.diameter_mm)
        assert all(e.kind in chest_phantom.EXCLUDED_KINDS for e in excluded)
    assert all(inside) and len(diameters) >= 30
    diameters = np.array(diameters)
    assert np.median(diameters) < 10 and 0.4 <= np.mean(diameters >= 6) <= 0.8


def test_excluded_findings_table_has_the_luna16_form(cohort):
    rows = _table(cohort / "annotations_excluded.csv")
    assert rows[0] == ANNOTATION_COLUMNS and len(rows) > 1
    for _, *xyz, diameter in rows[1:]:
        assert float(diameter) == -1 or 0 < float(diameter) < 3
        assert all(np.isfinite(float(v)) for v in xyz)


def test_no_header_field_depends_on_the_nodules(cohort, tmp_path):
    """The same seed without nodules writes the same files with the same headers: no
    header field, file name or slice count can predict has_nodule."""
    table = _table(cohort / "seriesuids.csv")
    assert table[0] == SERIES_COLUMNS and {r[1] for r in table[1:]} <= {"0", "1"}
    assert any(r[1] == "1" for r in table[1:])
    clean = tmp_path / "clean"
    synthesize_chest_cohort(clean, N_PATIENTS, SEED, max_nodules=0, **OPTIONS)
    assert {r[1] for r in _table(clean / "seriesuids.csv")[1:]} == {"0"}
    with_nodules, without = _ct_files(cohort), _ct_files(clean)
    assert with_nodules.keys() == without.keys()
    for series_uid, items in with_nodules.items():
        assert [p.relative_to(cohort) for p, _ in items] == [
            p.relative_to(clean) for p, _ in without[series_uid]
        ]
        for (_, a), (_, b) in zip(items, without[series_uid], strict=True):
            assert a == b


def test_the_lung_ct_cohort_needs_a_dicom_folder_named_dicom():
    config = {
        "data": {"dicom_root": "data/demo-lung/images", "labels_table": "y"},
        "synthesize": {"enabled": True, "cohort": "lung_ct", "min_matrix_px": 64,
                       "max_matrix_px": 64},
        "deid": {"key_file": "private/k", "private_dir": "private"},
    }  # fmt: skip
    with pytest.raises(ConfigError, match="lung_ct cohort writes its DICOM to a folder named"):
        check_config(config)
    config["data"]["dicom_root"] = "data/demo-lung/dicom"
    check_config(config)  # no annotations_table needed: the tables lie beside the DICOM
