"""LUNA16 scoring (radflow.luna16) against hand-computed FROC values, a loop-by-loop
reference of the challenge script's rules, MONAI's FROC, and LUNA16's real annotation
files (../shared/data/luna16, skipped where absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monai.metrics import compute_froc_curve_data, compute_froc_score
from sklearn.metrics import roc_curve

from radflow import luna16 as L
from radflow import metrics as M

LUNA = Path(__file__).resolve().parents[2] / "shared" / "data" / "luna16"


def _findings(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(L.ANNOTATION_COLUMNS)).astype(
        {c: float for c in L.ANNOTATION_COLUMNS[1:]}
    )


def _candidates(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(L.CANDIDATE_COLUMNS)).astype(
        {c: float for c in L.CANDIDATE_COLUMNS[1:]}
    )


NONE = _findings([])


def _froc_of(nodule_probs, fp_probs, n_scans, **kw) -> dict:
    """froc() of detected nodules (probability; NaN: missed) and false positives."""
    per_nodule = pd.DataFrame({"hit": ~np.isnan(nodule_probs), "probability": nodule_probs})
    per_candidate = pd.DataFrame({"status": "fp", "probability": np.asarray(fp_probs, float)})
    return L.froc(per_nodule, per_candidate, n_scans, **kw)


# ------------------------------------------------------------- hand-computed FROC
def test_perfect_detector_has_cpm_one():
    nodules = _findings([["a", 0, 0, 0, 6], ["a", 50, 0, 0, 6], ["b", 0, 0, 0, 8]])
    cands = _candidates(
        [["a", 0, 0, 0, 0.9], ["a", 50, 0, 0, 0.8], ["b", 1, 1, 1, 0.95]]
        + [[s, 100 + i, 0, 0, 0.1] for s in "abcd" for i in range(3)]
    )
    result = L.score(nodules, NONE, list("abcd"), cands, n_boot=50)
    assert result.sensitivities == (1.0,) * 7
    assert result.cpm == 1.0
    assert (result.cpm_ci_low, result.cpm_ci_high) == (1.0, 1.0)
    assert result.per_candidate["status"].value_counts().to_dict() == {"fp": 12, "tp": 3}


def test_missed_nodule_lowers_every_sensitivity_by_its_share():
    froc = _froc_of(np.array([0.9, 0.8, 0.7, np.nan]), [0.1] * 40, n_scans=4)
    assert froc["sensitivities"] == pytest.approx((0.75,) * 7, abs=1e-15)
    assert (froc["n_nodules"], froc["n_detected"], froc["n_fp"]) == (4, 3, 40)


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        # TPs above the FP at (or just after) 2 * rate, over 5 nodules
        ("grid", (0.2, 0.2, 0.2, 0.2, 0.4, 0.6, 0.8)),
        ("interpolate", (0.2, 0.2, 0.2, 0.2, 0.4, 0.6, 0.8)),
        # sklearn's corners (0,0) (0,.2) (1.5,.2) (1.5,.4) (2.5,.4) (2.5,.6) (5,.6) (5,.8)
        # (10,.8): the first nearest to each rate, without interpolation
        ("nearest_point", (0.0, 0.0, 0.0, 0.2, 0.2, 0.6, 0.8)),
    ],
)
def test_shuffled_scores_give_the_hand_computed_staircase(reading, expected):
    # Ranked by probability: T1 F1 F2 F3 T2 F4 F5 T3 F6..F10 T4 F11..F20, T5 missed; 2
    # scans, so the k-th FP is at k/2 FPs/scan. No TP follows the 1st, 2nd, 4th, 8th or
    # 16th FP, so the curve is flat at every rate (no vertical step near one).
    labels = ("T F F F T F F T F F F F F T" + " F" * 10).split()
    probs = 1.0 - 0.01 * np.arange(len(labels))
    tps = probs[[x == "T" for x in labels]]
    fps = probs[[x == "F" for x in labels]]
    froc = _froc_of(np.r_[tps, np.nan], fps, n_scans=2, reading=reading)
    assert froc["sensitivities"] == pytest.approx(expected, abs=1e-12)
    assert froc["cpm"] == pytest.approx(sum(expected) / 7, abs=1e-12)


def test_readings_differ_only_at_a_step_near_a_rate():
    # A vertical step 1e-4 FPs/scan past the rate 0.25: np.interp there is still on the
    # slope, the script grid's nearest point (0.2502125) is past the step, and the curve
    # point nearest 0.25 is the foot of the step.
    fps = np.array([0.0, 0.2501, 0.2501, 1.0])
    sens = np.array([0.0, 0.5, 0.75, 0.75])
    at = {r: L.sensitivity_at(fps, sens, [0.25], r)[0] for r in L.READINGS}
    assert at["interpolate"] == pytest.approx(0.5 * 0.25 / 0.2501, abs=1e-15)
    assert at["grid"] == 0.75
    assert at["nearest_point"] == 0.5


# ------------------------------------------------------------------ matching
def test_two_candidates_on_one_nodule_count_once_and_the_second_is_no_fp():
    nodules = _findings([["a", 10, 20, 30, 8]])
    cands = _candidates([["a", 11, 20, 30, 0.4], ["a", 10, 21, 30, 0.9], ["a", 90, 0, 0, 0.5]])
    per_nodule, per_candidate = L.match_candidates(nodules, NONE, cands)
    assert per_candidate["status"].tolist() == ["duplicate", "tp", "fp"]
    assert per_candidate["nodule_index"].tolist() == [0, 0, -1]
    assert per_nodule[["hit", "probability", "candidate_index"]].values.tolist() == [[True, 0.9, 1]]
    assert L.froc(per_nodule, per_candidate, 1)["n_fp"] == 1


def test_candidate_on_an_excluded_finding_is_ignored():
    excluded = _findings([["a", 0, 0, 0, 6]])
    cands = _candidates([["a", 2, 0, 0, 0.9], ["a", 40, 0, 0, 0.3]])
    _, per_candidate = L.match_candidates(NONE, excluded, cands)
    assert per_candidate["status"].tolist() == ["excluded", "fp"]


def test_excluded_finding_without_diameter_has_10_mm():
    excluded = _findings([["a", 0, 0, 0, -1]])
    cands = _candidates([["a", 4.99, 0, 0, 0.9], ["a", 0, 0, -5.0, 0.8], ["a", 0, 5.01, 0, 0.7]])
    _, per_candidate = L.match_candidates(NONE, excluded, cands)
    assert per_candidate["status"].tolist() == ["excluded", "fp", "fp"]


def test_candidate_at_exactly_the_radius_is_not_a_hit():
    # The script's test is dist^2 < (d/2)^2 (strict), so the boundary misses.
    nodules = _findings([["a", 0, 0, 0, 10]])
    on_boundary = _candidates([["a", 3, 4, 0, 0.9]])  # 3-4-5: distance exactly 5 mm
    inside = _candidates([["a", 3, 3.99, 0, 0.9]])
    assert L.match_candidates(nodules, NONE, on_boundary)[1]["status"].tolist() == ["fp"]
    assert L.match_candidates(nodules, NONE, inside)[1]["status"].tolist() == ["tp"]


def test_candidate_inside_two_nodules_detects_both():
    nodules = _findings([["a", 0, 0, 0, 10], ["a", 4, 0, 0, 10]])
    cands = _candidates([["a", 2, 0, 0, 0.7]])
    per_nodule, per_candidate = L.match_candidates(nodules, NONE, cands)
    assert per_nodule["hit"].tolist() == [True, True]
    assert per_candidate[["status", "nodule_index"]].values.tolist() == [["tp", 0]]


def test_a_scan_keeps_its_100_most_probable_candidates():
    probs = np.r_[np.linspace(0.2, 0.9, 101), 0.1]  # 102 candidates, all distinct
    cands = _candidates([["a", i * 20.0, 0, 0, p] for i, p in enumerate(probs)])
    status = L.match_candidates(NONE, NONE, cands)[1]["status"]
    assert (status == "fp").sum() == 100
    assert status.iloc[-1] == "over_cap" and status.iloc[0] == "over_cap"  # 0.1 and 0.2
    tied = cands.assign(probability=np.r_[np.full(101, 0.5), 0.9])  # 101st highest: 0.5
    assert (L.match_candidates(NONE, NONE, tied)[1]["status"] == "fp").sum() == 1


def test_candidates_and_nodules_of_unlisted_series_count_nowhere():
    nodules = _findings([["a", 0, 0, 0, 6], ["z", 0, 0, 0, 6]])
    cands = _candidates([["a", 0, 0, 0, 0.9], ["z", 50, 0, 0, 0.99]])
    result = L.score(nodules, NONE, ["a", "b"], cands, n_boot=20)
    assert result.n_nodules == 1 and result.n_scans == 2 and result.n_candidates == 1
    assert result.per_candidate["status"].tolist() == ["tp", "unlisted"]
    assert result.cpm == 1.0


# -------------------------------------------------------- reference and MONAI
def _script_reference(nodules, excluded, cands, seriesuids, max_marks):
    """The challenge script's rules written as its loops: per scan, per finding
    (included first), per candidate; FROC with sklearn's roc_curve."""
    labels, probs, n_nodules = [], [], 0
    for uid in seriesuids:
        scan = [r for r in cands.itertuples() if r.seriesuid == uid]
        if len(scan) > max_marks:
            cut = sorted((r.probability for r in scan), reverse=True)[max_marks]
            scan = [r for r in scan if r.probability > cut]
        left = {r.Index: r for r in scan}
        findings = [(r, True) for r in nodules.itertuples() if r.seriesuid == uid]
        findings += [(r, False) for r in excluded.itertuples() if r.seriesuid == uid]
        for f, included in findings:
            diameter = f.diameter_mm if f.diameter_mm >= 0 else 10.0
            inside = [
                c
                for c in scan
                if (f.coordX - c.coordX) ** 2
                + (f.coordY - c.coordY) ** 2
                + (f.coordZ - c.coordZ) ** 2
                < (diameter / 2) ** 2
            ]
            for c in inside:
                left.pop(c.Index, None)
            if included:
                n_nodules += 1
                if inside:
                    labels.append(1)
                    probs.append(max(c.probability for c in inside))
        labels += [0] * len(left)
        probs += [c.probability for c in left.values()]
    labels, probs = np.array(labels), np.array(probs)
    fpr, tpr, _ = roc_curve(labels, probs)
    n_fp, n_tp = int((labels == 0).sum()), int(labels.sum())
    return fpr * n_fp / len(seriesuids), tpr * n_tp / n_nodules


def test_matches_a_loop_reference_of_the_script_on_a_random_case():
    rng = np.random.default_rng(7)
    uids = [f"s{i}" for i in range(6)]

    def points(n, diameter):
        return [[rng.choice(uids), *rng.uniform(0, 40, 3), d] for d in diameter(n)]

    nodules = _findings(points(25, lambda n: rng.uniform(3, 14, n)))
    excluded = _findings(
        points(30, lambda n: np.where(rng.random(n) < 0.5, -1, rng.uniform(3, 9, n)))
    )
    cands = _candidates(points(400, lambda n: rng.random(n).round(2)))  # ties included
    per_nodule, per_candidate = L.match_candidates(nodules, excluded, cands, max_marks_per_scan=50)
    assert set(per_candidate["status"]) == {"tp", "duplicate", "excluded", "fp", "over_cap"}
    froc = L.froc(per_nodule, per_candidate, len(uids))
    fps, sens = _script_reference(nodules, excluded, cands, uids, 50)
    np.testing.assert_allclose(froc["fps"], fps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(froc["sensitivity"], sens, rtol=0, atol=1e-12)


def test_froc_agrees_with_monai_on_the_same_hits():
    # MONAI's compute_froc_curve_data skips the lowest threshold (it starts at
    # all_probs[1:]); an extra FP below every score restores that point and counts
    # nowhere else. MONAI does no rescaling by detected/total beyond counts and no
    # grid, so compare with reading="interpolate": both are np.interp of the same
    # polyline (sklearn drops only collinear points).
    rng = np.random.default_rng(3)
    tp, fp = rng.random(40), rng.random(300)
    n_targets, n_images = 55, 30
    froc = _froc_of(
        np.r_[tp, np.full(n_targets - tp.size, np.nan)], fp, n_images, reading="interpolate"
    )
    fps_m, sens_m = compute_froc_curve_data(np.r_[fp, -1.0], tp, n_targets, n_images)
    expected = np.interp(L.FP_RATES, fps_m[::-1], sens_m[::-1])
    np.testing.assert_allclose(froc["sensitivities"], expected, rtol=0, atol=1e-12)
    assert froc["cpm"] == pytest.approx(compute_froc_score(fps_m, sens_m, L.FP_RATES), abs=1e-12)


# ----------------------------------------------------------------- bootstrap
def test_bootstrap_resamples_scans_like_the_script():
    rng = np.random.default_rng(11)
    uids = [f"s{i}" for i in range(12)]
    nodules = _findings([[u, 0, 0, 0, 10] for u in uids[:9]])
    cands = _candidates(
        [[u, 1, 0, 0, rng.random()] for u in uids[:7]]
        + [[rng.choice(uids), 100, 0, 0, rng.random()] for _ in range(60)]
    )
    one = L.score(nodules, NONE, uids, cands, n_boot=1, seed=5)
    # the one replicate, built by hand: the drawn scans (repeats included) bring their
    # nodules and FPs, over the same number of scans
    drawn = [uids[i] for i in next(M.bootstrap_draws(len(uids), 1, 5))]
    pick = lambda t: pd.concat([t[t["seriesuid"] == u] for u in drawn])  # noqa: E731
    replicate = L.froc(pick(one.per_nodule), pick(one.per_candidate), len(uids))
    assert one.ci_low == one.ci_high == pytest.approx(replicate["sensitivities"], abs=1e-12)
    assert one.cpm_ci_low == pytest.approx(replicate["cpm"], abs=1e-12)
    again = L.score(nodules, NONE, uids, cands, n_boot=200, seed=5)
    assert again.to_json() == L.score(nodules, NONE, uids, cands, n_boot=200, seed=5).to_json()
    assert again.cpm_ci_low < again.cpm < again.cpm_ci_high
    assert np.all(again.curve_ci_low <= again.curve_ci_high)


# ---------------------------------------------------------------- files, CLI
def test_readers_name_file_line_and_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,probability\na,1,2,3,0.5\na,1,x,3,0.5\n")
    with pytest.raises(L.LunaInputError, match=r"c\.csv:3: column 'coordY': 'x' is not a number"):
        L.read_candidates(path)
    path.write_text("seriesuid,coordX,coordY,coordZ\n")
    with pytest.raises(L.LunaInputError, match=r"c\.csv:1: missing column\(s\) probability"):
        L.read_candidates(path)
    uids = tmp_path / "s.csv"
    uids.write_text("seriesuid\n1.2.3\n\n1.2.4\n")
    assert L.read_seriesuids(uids) == ["1.2.3", "1.2.4"]
    uids.write_text("1.2.3\n1.2.3\n")
    with pytest.raises(L.LunaInputError, match=r"s\.csv:2: series 1\.2\.3 is listed again"):
        L.read_seriesuids(uids)


def _write_case(folder: Path) -> list[Path]:
    files = {
        "annotations.csv": "seriesuid,coordX,coordY,coordZ,diameter_mm\na,0,0,0,6\nb,0,0,0,6\n",
        "excluded.csv": "seriesuid,coordX,coordY,coordZ,diameter_mm\na,30,0,0,-1\n",
        "seriesuids.csv": "a\nb\n",
        "candidates.csv": "seriesuid,coordX,coordY,coordZ,probability\n"
        "a,1,0,0,0.9\na,30,1,0,0.8\na,60,0,0,0.3\nb,60,0,0,0.2\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return [folder / name for name in files]


def test_command_prints_scores_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "radflow.luna16", *map(str, _write_case(tmp_path)),
         "--out", str(out), "--n-boot", "50"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # a detected, b missed; 2 FPs over 2 scans: sensitivity 0.5 at every rate
    assert "      CPM        0.500" in run.stdout
    assert run.stdout.count("0.500  [") == 8
    summary = json.loads((out / "froc.json").read_text())
    assert summary["candidates"] == {"tp": 1, "duplicate": 0, "excluded": 1, "fp": 2,
                                     "over_cap": 0, "unlisted": 0}  # fmt: skip
    per_nodule = pd.read_csv(out / "per_nodule.tsv", sep="\t")
    assert per_nodule["hit"].tolist() == [True, False]
    assert (out / "froc.png").stat().st_size > 0


def test_command_rejects_a_malformed_file_without_traceback(tmp_path):
    files = _write_case(tmp_path)
    files[3].write_text("seriesuid,coordX,coordY,coordZ,probability\na,1,0,0,high\n")
    run = subprocess.run(
        [sys.executable, "-m", "radflow.luna16", *map(str, files)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "candidates.csv:2: column 'probability': 'high' is not a number" in run.stderr
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------- real LUNA16 files
@pytest.mark.skipif(not LUNA.is_dir(), reason=f"LUNA16 reference files not found at {LUNA}")
def test_real_annotations_as_candidates_score_cpm_one():
    nodules = L.read_annotations(LUNA / "annotations.csv")
    excluded = L.read_annotations(LUNA / "annotations_excluded.csv")
    uids = L.read_seriesuids(LUNA / "seriesuids.csv")
    assert (len(nodules), len(excluded), len(uids)) == (1186, 35192, 888)
    cands = nodules.drop(columns="diameter_mm").assign(probability=1.0)
    result = L.score(nodules, excluded, uids, cands, n_boot=20)
    assert (result.n_nodules, result.n_scans) == (1186, 888)
    assert result.per_nodule["hit"].all()
    assert (result.per_candidate["status"] == "fp").sum() == 0
    assert result.cpm == 1.0 and result.sensitivities == (1.0,) * 7
