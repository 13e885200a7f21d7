"""The segmentation demo's cohort: two-channel brain MR as real DICOM, ground truth that
lines up with the converted reference series, labels that headers cannot give away."""

import re
from collections import defaultdict

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from radflow.synth import brain_phantom as bp
from radflow.synth.brain import (
    FLAIR_PATTERN,
    LABEL_COLUMNS,
    LESION_COLUMNS,
    MR_IMAGE_STORAGE,
    POST_CONTRAST_PATTERN,
    BrainCohortSpec,
    render_case,
    synthesize_brain_cohort,
)
from radflow.synth.brain_truth import SEGMENT_NAMES, dcm2niix_grid
from radflow.synth.export import GIVEN_NAMES, INSTITUTIONS, SURNAMES, uid

from dcm2niix_reference import run_dcm2niix
from synth_cohort import tree_digest

N_PATIENTS, SEED, SCALE = 8, 1, 3.0  # scale 3: ~3 mm pixels, fast; the geometry is the same


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain")
    synthesize_brain_cohort(root, N_PATIENTS, SEED, workers=2, scale=SCALE)
    return root


@pytest.fixture(scope="module")
def series(cohort):
    """{SeriesInstanceUID: [(path, header), ...]} of every image file."""
    found = defaultdict(list)
    for path in sorted((cohort / "dicom").rglob("*")):
        if path.is_file():
            found[pydicom.dcmread(path).SeriesInstanceUID].append(path)
    return {
        series_uid: [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
        for series_uid, paths in found.items()
    }


def _channel(header) -> str:
    return "flair" if re.search(FLAIR_PATTERN, header.SeriesDescription) else "t1post"


def _sorted_stack(items):
    """The files of a series in slice order (along the normal) and their geometry."""
    iop = np.array(items[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    items = sorted(items, key=lambda t: np.array(t[1].ImagePositionPatient, float) @ normal)
    positions = np.array([np.array(h.ImagePositionPatient, float) for _, h in items])
    step = float((positions[-1] - positions[0]) @ normal / (len(items) - 1))
    first = items[0][1]
    geometry = bp.SliceGeometry(
        row_cosine=tuple(iop[:3]),
        col_cosine=tuple(iop[3:]),
        row_spacing_mm=float(first.PixelSpacing[0]),
        col_spacing_mm=float(first.PixelSpacing[1]),
        slice_step_mm=step,
        thickness_mm=float(first.SliceThickness),
        shape=(len(items), int(first.Rows), int(first.Columns)),
        origin_lps=tuple(positions[0]),
    )
    return items, geometry


def _cases(series):
    """{StudyInstanceUID: {"flair": items, "t1post": items}}."""
    cases = defaultdict(dict)
    for items in series.values():
        cases[items[0][1].StudyInstanceUID][_channel(items[0][1])] = items
    return cases


def test_same_seed_writes_identical_files_whatever_the_worker_count(cohort, tmp_path):
    again = tmp_path / "again"
    synthesize_brain_cohort(again, N_PATIENTS, SEED, workers=1, scale=SCALE)
    assert tree_digest(again) == tree_digest(cohort)


def test_each_study_is_one_case_of_two_channels_picked_by_description(series):
    cases = _cases(series)
    assert len(cases) == N_PATIENTS
    for channels in cases.values():
        assert set(channels) == {"flair", "t1post"}
        flair, t1post = channels["flair"][0][1], channels["t1post"][0][1]
        assert flair.SeriesInstanceUID != t1post.SeriesInstanceUID
        assert flair.FrameOfReferenceUID == t1post.FrameOfReferenceUID
        assert flair.AccessionNumber == t1post.AccessionNumber
    headers = [h for items in series.values() for _, h in items]
    for h in headers:
        assert h.Modality == "MR" and h.SOPClassUID == MR_IMAGE_STORAGE
        matches = [
            bool(re.search(p, h.SeriesDescription)) for p in (FLAIR_PATTERN, POST_CONTRAST_PATTERN)
        ]
        assert sum(matches) == 1, h.SeriesDescription  # fmt: skip
    assert len({h.Manufacturer for h in headers}) >= 3
    assert len({items[0][1].SeriesDescription for items in series.values()}) >= 8
    assert {h.PixelRepresentation for h in headers} == {0, 1}
    assert any("RescaleSlope" in h for h in headers)
    assert {h.MRAcquisitionType for h in headers} == {"2D", "3D"}


def test_geometry_is_anisotropic_varied_and_not_shared_by_the_channels(series):
    orientations, differ = set(), 0
    for channels in _cases(series).values():
        geometries = {name: _sorted_stack(items)[1] for name, items in channels.items()}
        flair = geometries["flair"]
        assert flair.slice_step_mm >= 3
        assert np.isclose(flair.slice_step_mm, float(channels["flair"][0][1].SpacingBetweenSlices))
        differ += geometries["flair"] != geometries["t1post"]
        for g in geometries.values():
            normal = np.abs(g.normal)
            axis = int(np.argmax(normal))
            orientations.add(
                {0: "sagittal", 2: "axial"}[axis] if normal[axis] > 0.999 else "oblique"
            )
    assert differ == N_PATIENTS
    assert orientations == {"axial", "sagittal", "oblique"}
    # slices are written in random order: file names say nothing about position
    items = next(iter(series.values()))
    names = [p.name for p, _ in sorted(items, key=lambda t: int(t[1].InstanceNumber))]
    assert names != sorted(names)


def test_headers_carry_fake_phi_for_deidentification_to_remove(series):
    for items in series.values():
        h = items[0][1]
        family, given = str(h.PatientName).split("^")
        assert family in SURNAMES and given in GIVEN_NAMES
        assert len(h.PatientID) == 10 and len(h.PatientBirthDate) == 8
        assert h.AccessionNumber.startswith("ACC") and h.InstitutionName in INSTITUTIONS
        assert h.ReferringPhysicianName and h.OperatorsName and h.DeviceSerialNumber


def test_every_series_converts_with_dcm2niix_onto_its_header_geometry(series, tmp_path):
    for n, items in enumerate(series.values()):
        items, geometry = _sorted_stack(items)
        stack = np.stack([pydicom.dcmread(p).pixel_array for p, _ in items])
        (tmp_path / str(n)).mkdir()
        converted = run_dcm2niix([p for p, _ in items], tmp_path / str(n))
        image = nib.Nifti1Image(np.asarray(converted.dataobj.get_unscaled()), converted.affine)
        expected = nib.Nifti1Image(stack[:, ::-1, :].T, dcm2niix_grid(geometry))
        if items[0][1].MRAcquisitionType == "3D":
            # dcm2niix turns 3D volumes losslessly to the closest RAS orientation; 2D
            # stacks (the FLAIR, which the labels follow) stay as acquired, rows flipped
            image, expected = nib.as_closest_canonical(image), nib.as_closest_canonical(expected)
        # where dcm2niix starts from the last slice (reversed numbering, 3D turned round)
        # its single-precision slice step moves the origin by up to ~3e-4 mm
        reference = re.search(FLAIR_PATTERN, items[0][1].SeriesDescription)
        np.testing.assert_allclose(image.affine, expected.affine, atol=1e-4 if reference else 1e-3)
        assert np.array_equal(np.asarray(image.dataobj), np.asarray(expected.dataobj))


def test_labels_table_has_one_row_per_case_in_both_forms(cohort):
    labels = pd.read_csv(cohort / "labels.csv", dtype={"StudyInstanceUID": str})
    lesions = pd.read_csv(cohort / "lesions.csv", dtype={"StudyInstanceUID": str})
    assert list(labels.columns) == LABEL_COLUMNS and list(lesions.columns) == LESION_COLUMNS
    assert len(labels) == N_PATIENTS and labels["StudyInstanceUID"].is_unique
    assert set(labels["label_form"]) == {"nifti", "seg"}
    assert set(labels["lesion"]) == {0, 1}
    positive = set(labels.loc[labels["lesion"] == 1, "StudyInstanceUID"])
    assert positive == set(lesions["StudyInstanceUID"])
    assert (lesions["label_voxels"] > 0).all()  # even lesions smaller than the voxels
    assert lesions["diameter_mm"].between(5, 40).all()
    for row in labels.itertuples():
        path = cohort / row.label_path
        assert path.is_file() and path.parent == cohort / "labels"
        assert path.name.endswith({"nifti": ".nii.gz", "seg": ".dcm"}[row.label_form])


def test_nifti_label_lies_on_dcm2niix_conversion_of_the_flair(cohort, series, tmp_path):
    labels = pd.read_csv(cohort / "labels.csv", dtype={"StudyInstanceUID": str})
    cases = _cases(series)
    checked = 0
    for row in labels[labels["label_form"] == "nifti"].itertuples():
        label = nib.load(cohort / row.label_path)
        flair_files = [p for p, _ in cases[row.StudyInstanceUID]["flair"]]
        (tmp_path / row.StudyInstanceUID).mkdir()
        flair = run_dcm2niix(flair_files, tmp_path / row.StudyInstanceUID)
        assert label.shape == flair.shape
        np.testing.assert_allclose(label.affine, flair.affine, atol=1e-4)
        _assert_itk_sees_the_label_on_the_series(cohort / row.label_path, flair_files)
        values = np.asarray(label.dataobj)
        assert set(np.unique(values)) <= {0, 1, 2, 4}
        assert bool(values.any()) == bool(row.lesion)
        if row.lesion:  # the voxels line up too: oedema is where the FLAIR is bright
            image = flair.get_fdata()
            brain = image > np.percentile(image, 60)
            assert image[values == 2].mean() > 1.3 * np.median(image[brain & (values == 0)])
            checked += 1
    assert checked >= 2


def _assert_itk_sees_the_label_on_the_series(label_path, series_files):
    """SimpleITK (LPS throughout) puts label voxel (i, j, k) where it puts the DICOM
    series' column i, row rows-1-j (dcm2niix's flip) of slice k."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_files[0].parent)))
    series = reader.Execute()
    label = sitk.ReadImage(str(label_path))
    assert label.GetSize() == series.GetSize()
    n_i, n_j, n_k = (n - 1 for n in series.GetSize())
    for i, j, k in [(0, 0, 0), (n_i, 0, 0), (0, n_j, 0), (0, 0, n_k), (n_i, n_j, n_k)]:
        np.testing.assert_allclose(
            label.TransformIndexToPhysicalPoint((i, j, k)),
            series.TransformIndexToPhysicalPoint((i, n_j - j, k)),
            atol=1e-4,
        )


def _patient_index(study_uid: str) -> int:
    return next(p for p in range(N_PATIENTS) if uid(SEED, "study", p) == study_uid)


def test_seg_reads_back_as_the_label_map_on_the_flair_instances(cohort, series):
    labels = pd.read_csv(cohort / "labels.csv", dtype={"StudyInstanceUID": str})
    cases = _cases(series)
    spec = BrainCohortSpec(n_patients=N_PATIENTS, seed=SEED, scale=SCALE)
    seg_rows = labels[labels["label_form"] == "seg"]
    checked = set()
    for row in seg_rows.sort_values("lesion").drop_duplicates("lesion").itertuples():
        seg = hd.seg.segread(cohort / row.label_path)
        items, _ = _sorted_stack(cases[row.StudyInstanceUID]["flair"])
        assert seg.StudyInstanceUID == row.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == items[0][1].SeriesInstanceUID
        assert [s.SegmentLabel for s in seg.SegmentSequence] == list(SEGMENT_NAMES)
        numbers = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[h.SOPInstanceUID for _, h in items],
            combine_segments=True,
        )
        label = np.array([0, 1, 2, 4], dtype=np.uint8)[numbers]
        expected = render_case(spec, _patient_index(row.StudyInstanceUID), "seg").label
        assert np.array_equal(label, expected)
        checked.add(row.lesion)
    assert checked == {0, 1}


def test_lesion_centres_in_world_space_match_the_label_maps(cohort):
    labels = pd.read_csv(cohort / "labels.csv", dtype={"StudyInstanceUID": str})
    lesions = pd.read_csv(cohort / "lesions.csv", dtype={"StudyInstanceUID": str})
    checked = 0
    nifti = labels[(labels["label_form"] == "nifti") & (labels["lesion"] == 1)]
    for row in nifti.itertuples():
        image = nib.load(cohort / row.label_path)
        values = np.asarray(image.dataobj)
        ijk = np.argwhere(values > 0)
        lps = nib.affines.apply_affine(image.affine, ijk) * [-1, -1, 1]  # RAS -> LPS
        mine = lesions[lesions["StudyInstanceUID"] == row.StudyInstanceUID]
        centres = mine[["centre_x_mm", "centre_y_mm", "centre_z_mm"]].to_numpy()
        nearest = np.argmin(np.linalg.norm(lps[:, None] - centres[None], axis=2), axis=1)
        for n, lesion in enumerate(mine.itertuples()):
            if lesion.label_voxels < 20:
                continue  # a few voxels: no stable centre of mass
            found = lps[nearest == n].mean(0)
            # within one voxel along each of the label map's axes
            offset = np.linalg.solve(image.affine[:3, :3], (found - centres[n]) * [-1, -1, 1])
            assert np.all(np.abs(offset) < 1), (offset, lesion)
            checked += 1
    assert checked >= 2


def test_lesion_zones_have_their_contrast_in_both_channels():
    """FLAIR: oedema brighter than the mirror-image white matter; T1-post: the enhancing
    rim brighter than the necrotic core and than white matter."""
    head = bp.sample_head(np.random.default_rng(0))
    centre = np.asarray(head.centre_lps) + [30, 10, 20]
    lesion = bp.Lesion(tuple(centre), 24.0, (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), 0.6, 0.5,
                       0.15, 7)  # fmt: skip
    phantom = bp.build_phantom(head, [lesion], 1.5)

    def stack(step):
        n = int(120 / step)
        origin = tuple(np.asarray(head.centre_lps) - [60, 60, 60])
        return bp.SliceGeometry((1, 0, 0), (0, 1, 0), 1.5, 1.5, step, step, (n, 80, 80), origin)

    for contrast, geometry in (("flair", stack(4.0)), ("t1post", stack(1.5))):
        image = bp.sample_series(phantom, contrast, geometry, 1.0, 0.0, np.random.default_rng(1))
        label, _ = bp.sample_labels(phantom, geometry)
        mirror = label[:, :, ::-1]  # x -> -x about the head centre: healthy hemisphere
        healthy = image[(mirror > 0) & (label == 0)].mean()
        zone = {z: image[label == z].mean() for z in bp.LESION_LABELS}
        if contrast == "flair":
            assert zone[bp.OEDEMA] > 1.5 * healthy
        else:
            assert zone[bp.ENHANCING] > 1.3 * healthy > 1.3 * zone[bp.NECROSIS]
    assert np.allclose(phantom.lesions[0].centroid_lps, centre, atol=3)


def _headers_and_layout(root):
    """Every DICOM file's relative path and size, and its header without pixel data."""
    out = {}
    for path in sorted(p for p in (root / "dicom").rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        pixels = ds.PixelData
        del ds.PixelData
        out[path.relative_to(root).as_posix()] = (path.stat().st_size, ds.to_json(), pixels)
    return out


def test_headers_file_names_and_sizes_do_not_depend_on_lesions(tmp_path):
    """By construction: the same patients written once without and once with three
    lesions each differ in pixel values only."""
    none, many = tmp_path / "none", tmp_path / "many"
    synthesize_brain_cohort(none, 2, SEED, scale=SCALE, lesion_count_p=(1, 0, 0, 0))
    synthesize_brain_cohort(many, 2, SEED, scale=SCALE, lesion_count_p=(0, 0, 0, 1))
    a, b = _headers_and_layout(none), _headers_and_layout(many)
    assert a.keys() == b.keys()
    assert all(a[k][:2] == b[k][:2] for k in a)
    assert sum(a[k][2] != b[k][2] for k in a) > 10  # while the pixels do show the lesions
