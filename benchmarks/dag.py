"""How long does Snakemake take to plan a 100,000-series study? Planning time of the
full radflow DAG, and of a no-op rerun, on a synthetic index of headers only, against
the same two measurements on a demo-sized index (100 series), in one run.

    python benchmarks/dag.py [--series 100000] [--small 100] [--keep DIR]

For each size the script builds, in a temporary folder: a DICOM root of empty files (one
per series: enough for the tree fingerprint and `shards: auto`, which only list and stat
files), a labels table, and the index stage's outputs as radflow's index would write them
(results/index/*.tsv, private/index/<shard>.tsv, one row per series). It marks them up
to date with `snakemake --touch`, then times:

- plan: `snakemake --dry-run` of the full study (convert ... figures still to do);
- no-op: `snakemake --dry-run` after every output exists and is marked complete;
- startup: `snakemake --version`, the fixed cost of any Snakemake call;
- tree scan: radflow's share of parsing, listing and fingerprinting the DICOM root
  (done once per Snakemake call, in-process here).

Prints wall times, job counts and ratios (large/small), and checks that the job count is
O(shards + folds): jobs = 2 x shards + 2 x folds + 5 whatever the number of series.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from radflow import conventions as C
from radflow.dicom.index import IndexResult
from radflow.files import list_files, tree_fingerprint

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
N_FOLDS = 5


def write_study(root: Path, n_series: int) -> tuple[Path, int]:
    """A study folder with `n_series` indexed series; returns (config file, shards)."""
    dicom = root / "dicom"
    for i in range(n_series):  # 100 files a folder, like an export's series folders
        folder = dicom / f"{i // 100:05d}"
        if i % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"IM{i:07d}").touch()
    n_shards = C.auto_shard_count(n_series)
    pids = [f"ser-{i:016x}" for i in range(n_series)]
    paths = [f"{i // 100:05d}/IM{i:07d}" for i in range(n_series)]
    series = pd.DataFrame(
        {
            C.SERIES_PID: pids,
            C.STUDY_PID: [f"stu-{i:016x}" for i in range(n_series)],
            C.PATIENT_PID: [f"pat-{i // 2:016x}" for i in range(n_series)],
            C.LABEL: [i % 2 for i in range(n_series)],
            C.SHARD: [C.shard_of(p, n_shards) for p in pids],
            C.MODALITY: "DX",
            "n_files": 1,
            "rows": 2048,
            "columns": 2048,
            "photometric": "MONOCHROME2",
            "pixel_spacing_mm": "0.15\\0.15",
            "body_part": "CHEST",
            "view_position": "PA",
            "manufacturer": "ACME",
        }
    )
    files = pd.DataFrame({C.SERIES_PID: pids, C.MODALITY: "DX", C.PATH: paths, C.FRAMES: ""})
    shard_files = {k: files[series[C.SHARD] == k].reset_index(drop=True) for k in range(n_shards)}
    empty = pd.DataFrame(columns=[C.FILE_ID, C.SERIES_PID, C.REASON])
    IndexResult(
        series=series,
        quarantine=empty,
        quarantine_paths=pd.DataFrame(columns=[C.FILE_ID, C.SERIES_PID, C.PATH, C.REASON]),
        shard_files=shard_files,
        annotations=pd.DataFrame(columns=[C.SERIES_PID, C.ROW_PX, C.COL_PX, C.DIAMETER_MM]),
        summary={"n_units": n_series, "n_shards": n_shards},
    ).write(root / "results" / "index", root / "private")
    labels = root / "labels.csv"
    labels.write_text("AccessionNumber,finding\n")
    config = root / "study.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "synthesize": {"enabled": False},
                "data": {
                    "dicom_root": str(dicom),
                    "labels_table": str(labels),
                    "annotations_table": None,
                },
                "deid": {"key_file": str(root / "secret.key"), "private_dir": "private"},
                "shards": "auto",
                "split": {"n_folds": N_FOLDS},
            }
        )
    )
    return config, n_shards


def snakemake(root: Path, config: Path, *args: str) -> tuple[float, str]:
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(root),
        "--configfile",
        str(REPO / "config" / "config.yaml"),
        str(config),
        "--cores",
        "2",
        *args,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return elapsed, done.stdout + done.stderr


def job_count(text: str) -> int:
    if "Nothing to be done" in text:
        return 0
    return int(re.search(r"^total\s+(\d+)$", text, re.M)[1])


def index_outputs(root: Path) -> list[str]:
    out = [
        str(p.relative_to(root))
        for p in [*(root / "results" / "index").glob("*"), *(root / "private").rglob("*.tsv")]
    ]
    return sorted(out)


def fake_outputs(root: Path, n_shards: int) -> None:
    """Every output of the stages after index, as placeholders (only existence and
    mtimes matter to planning)."""
    results = root / "results"
    for k in range(n_shards):
        for stage in ("nifti", "preprocessed"):
            (results / stage / C.shard_name(k)).mkdir(parents=True, exist_ok=True)
    files = [
        "split/folds.tsv",
        *[f"train/fold{f}/{n}" for f in range(N_FOLDS) for n in ("model.pt", "history.tsv")],
        *[f"predict/fold{f}.tsv" for f in range(N_FOLDS)],
        *[f"evaluate/{n}" for n in ("metrics.json", "metrics.tsv", "per_case.tsv", "curves.json")],
        *[
            f"figures/{n}.png"
            for n in (
                "roc",
                "precision_recall",
                "calibration",
                "confusion",
                "training_curves",
                "gradcam_true_positives",
                "gradcam_false_positives",
            )
        ],
    ]
    for rel in files:
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        (results / rel).touch()


def measure(root: Path, n_series: int) -> dict:
    t0 = time.perf_counter()
    config, n_shards = write_study(root, n_series)
    build_s = time.perf_counter() - t0
    # the part of planning that is radflow's own: listing and fingerprinting the tree
    t0 = time.perf_counter()
    tree_fingerprint(root / "dicom", list_files(root / "dicom"))
    tree_s = time.perf_counter() - t0
    snakemake(root, config, "--touch", *index_outputs(root))
    plan_s, plan_out = snakemake(root, config, "--dry-run", "--quiet", "rules")
    fake_outputs(root, n_shards)
    snakemake(root, config, "--touch")
    noop_s, noop_out = snakemake(root, config, "--dry-run", "--quiet", "rules")
    return {
        "series": n_series,
        "shards": n_shards,
        "build_s": build_s,
        "tree_s": tree_s,
        "plan_s": plan_s,
        "plan_jobs": job_count(plan_out),
        "noop_s": noop_s,
        "noop_jobs": job_count(noop_out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="build the studies here and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="radflow_dag_") as tmp:
        base = args.keep or Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([*SNAKEMAKE, "--version"], check=True, capture_output=True)
        startup_s = time.perf_counter() - t0
        small = measure(base / "small", args.small)
        large = measure(base / "large", args.series)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor() or "?",
    )
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"snakemake --version (start-up): {startup_s:.2f} s")
    print("series   shards  jobs  plan (s)  no-op (s)  no-op jobs  tree scan (s)")
    for r in (small, large):
        print(
            f"{r['series']:>7}  {r['shards']:>6}  {r['plan_jobs']:>4}  {r['plan_s']:>8.2f}  "
            f"{r['noop_s']:>9.2f}  {r['noop_jobs']:>10}  {r['tree_s']:>13.2f}"
        )
    ratio = large["series"] / small["series"]
    print(
        f"ratio {args.series} / {args.small} series ({ratio:.0f}x the data): "
        f"plan {large['plan_s'] / small['plan_s']:.2f}x, no-op {large['noop_s'] / small['noop_s']:.2f}x; "
        f"plan / start-up {large['plan_s'] / startup_s:.1f}x"
    )
    print(json.dumps({"startup_s": startup_s, "small": small, "large": large}))
    problems = []
    for r in (small, large):
        # everything after index: convert + preprocess per shard, train + predict per
        # fold, split, evaluate, figures, case_figures, all
        expected = 2 * r["shards"] + 2 * N_FOLDS + 5
        if r["plan_jobs"] != expected:
            problems.append(f"{r['series']} series: {r['plan_jobs']} jobs, expected {expected}")
        if r["noop_jobs"] != 0:
            problems.append(f"{r['series']} series: the no-op rerun plans {r['noop_jobs']} jobs")
    if large["plan_s"] > 30:
        problems.append(f"planning took {large['plan_s']:.1f} s, over the 30 s goal")
    if problems:
        sys.exit("FAILED: " + "; ".join(problems))


if __name__ == "__main__":
    main()
