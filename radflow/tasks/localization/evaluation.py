"""Evaluation of the localisation task: LUNA16's FROC and CPM per evaluation set.

Two sets, as for segmentation: the development scans, each through the fold model that
did not train on it (out-of-fold), and the held-out test scans through the ensemble of
the fold models (their candidates merged: `centres.merge_candidates`). Each set is
scored by `radflow.luna16.score` against the ground truth the predict stage wrote in
LUNA16's form, with a bootstrap over scans.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from radflow import conventions as C
from radflow.tables import atomic_path, read_tsv, write_tsv
from radflow.tasks.localization import task as T

EVAL_FROC_TABLE = "froc.tsv"
EVAL_PER_NODULE = "per_nodule.tsv"
EVAL_SUBMISSION = "candidates.csv"  # every evaluated scan's candidates, LUNA16's form
EVAL_CANDIDATES = "candidates_scored.tsv"  # ... with their status (hit, FP, ...)
EVAL_JSON = "metrics.json"
SET_OUT_OF_FOLD = "out-of-fold"
SET_TEST = "test (ensemble)"
LUNA_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def _fold_dirs(predictions: pd.DataFrame) -> dict[int, Path]:
    return {int(f): Path(d) for f, d in
            predictions[[C.FOLD, T.PREDICTION_DIR]].drop_duplicates().itertuples(index=False)}  # fmt: skip


def _truth(dirs) -> tuple[pd.DataFrame, pd.DataFrame]:
    from radflow.luna16 import read_annotations

    frames = {T.ANNOTATIONS: [], T.EXCLUDED: []}
    for d in dirs:
        for name in frames:
            frames[name].append(read_annotations(d / name))
    return tuple(pd.concat(frames[n], ignore_index=True).drop_duplicates().reset_index(drop=True)
                 for n in (T.ANNOTATIONS, T.EXCLUDED))  # fmt: skip


def set_candidates(predictions: pd.DataFrame, settings) -> dict[str, pd.DataFrame]:
    """Per evaluation set, its scans' candidates (LUNA_COLUMNS + diameter_mm)."""
    from radflow.tasks.localization.centres import merge_candidates

    dirs = _fold_dirs(predictions)
    details = {f: read_tsv(d / T.CANDIDATE_DETAILS) for f, d in dirs.items()}
    out = {}
    val = predictions[predictions[C.SPLIT] == "val"]
    if len(val):
        parts = [details[f][details[f]["seriesuid"].isin(set(rows[C.SERIES_PID]))]
                 for f, rows in val.groupby(C.FOLD)]  # fmt: skip
        out[SET_OUT_OF_FOLD] = pd.concat(parts, ignore_index=True)
    test = predictions[predictions[C.SPLIT] == "test"]
    if len(test):
        rows = []
        for pid in sorted(set(test[C.SERIES_PID])):
            groups = []
            for f in sorted(set(test.loc[test[C.SERIES_PID] == pid, C.FOLD])):
                d = details[f][details[f]["seriesuid"] == pid]
                groups.append({"points_mm": d[["coordX", "coordY", "coordZ"]].to_numpy(float),
                               "diameters_mm": d[C.DIAMETER_MM].to_numpy(float),
                               "scores": d["probability"].to_numpy(float)})  # fmt: skip
            merged = merge_candidates(groups, settings.nms_distance_mm)
            for p, dia, s in zip(merged["points_mm"], merged["diameters_mm"], merged["scores"],
                                 strict=True):  # fmt: skip
                rows.append((pid, *p, s, dia))
        out[SET_TEST] = pd.DataFrame(rows, columns=[*LUNA_COLUMNS, C.DIAMETER_MM])
    return out


def evaluate_localization(predictions: pd.DataFrame, settings, *, n_boot: int, out_dir: Path,
                          seed: int = 0) -> str:  # fmt: skip
    """Score every evaluation set (module docstring); write EVAL_* into `out_dir`.
    Returns the headline."""
    from radflow.luna16 import FP_RATES, score

    dirs = _fold_dirs(predictions)
    annotations, excluded = _truth(dirs.values())
    image_of = dict(zip(predictions[C.SERIES_PID], predictions[T.IMAGE], strict=False))
    froc_rows, nodule_tables, candidate_tables, submissions, results = [], [], [], [], {}
    for name, candidates in set_candidates(predictions, settings).items():
        split = "val" if name == SET_OUT_OF_FOLD else "test"
        scans = sorted(set(predictions.loc[predictions[C.SPLIT] == split, C.SERIES_PID]))
        result = score(annotations[annotations["seriesuid"].isin(scans)],
                       excluded[excluded["seriesuid"].isin(scans)], scans,
                       candidates[LUNA_COLUMNS], n_boot=n_boot, seed=seed)  # fmt: skip
        results[name] = summary = result.summary()
        for rate, sens, lo, hi in zip(FP_RATES, summary["sensitivities"], summary["ci_low"],
                                      summary["ci_high"], strict=True):  # fmt: skip
            froc_rows.append((name, f"{rate:g}", sens, lo, hi))
        froc_rows.append((name, "CPM", summary["cpm"], summary["cpm_ci_low"],
                          summary["cpm_ci_high"]))  # fmt: skip
        nodules = result.per_nodule.copy()
        nodules.insert(0, "set", name)
        nodule_tables.append(nodules)
        scored = result.per_candidate.copy()
        scored.insert(0, "set", name)
        candidate_tables.append(scored)
        submissions.append(candidates[LUNA_COLUMNS])
    if not results:
        raise ValueError("no validation or test scan was predicted: nothing to evaluate")
    froc = pd.DataFrame(
        froc_rows, columns=["set", "fp_per_scan", "sensitivity", "ci_low", "ci_high"]
    )
    write_tsv(froc, out_dir / EVAL_FROC_TABLE)
    nodules = pd.concat(nodule_tables, ignore_index=True)
    nodules[T.IMAGE] = nodules["seriesuid"].map(image_of)
    write_tsv(nodules, out_dir / EVAL_PER_NODULE)
    scored = pd.concat(candidate_tables, ignore_index=True)
    scored[T.IMAGE] = scored["seriesuid"].map(image_of)
    write_tsv(scored, out_dir / EVAL_CANDIDATES)
    with atomic_path(out_dir / EVAL_SUBMISSION) as tmp:
        pd.concat(submissions, ignore_index=True).to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_dir / EVAL_JSON) as tmp:
        Path(tmp).write_text(json.dumps({"sets": results, "n_boot": n_boot}, indent=1))
    return "; ".join(
        f"{name}: CPM {r['cpm']:.3f} ({r['cpm_ci_low']:.3f}-{r['cpm_ci_high']:.3f}), "
        f"{r['n_scans']} scans, {r['n_nodules']} nodules"
        for name, r in results.items()
    )


def headline_values(metrics_json: Path) -> dict:
    """The evaluation's sets as stored (figures read these, recompute nothing)."""
    return json.loads(Path(metrics_json).read_text())["sets"]
