"""The tiny study on a real SLURM cluster (one node on 127.0.0.1, started for this module by
tests/slurm_cluster.py) through `--workflow-profile profiles/slurm`: every job Snakemake
plans runs as a SLURM job, with the resources the study config asks for and a GPU for the
GPU rules, and the results equal those of a local run of the same study.

Skipped, with the reason, where no cluster can be started: not root, or SLURM/munge
neither installed nor installable with apt-get, or the SLURM executor plugin missing."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import slurm_cluster

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    REPO / "config" / "config.yaml",
    REPO / "tests" / "configs" / "tiny.yaml",
    REPO / "tests" / "configs" / "slurm.yaml",  # resources that fit a 2-core test node
]
PROFILE = REPO / "profiles" / "slurm"
# Cluster-specific options on top of the profile: this test cluster has no accounting, so
# job status comes from squeue (MinJobAge is a day); the first status check comes after
# 1 s instead of 40 s; the logs of successful jobs are kept to be read below.
SLURM_ARGS = [
    "--workflow-profile",
    str(PROFILE),
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-keep-successful-logs",
]
# Both GPU requests the README documents: train keeps the profile's --gpus=1, predict
# takes the GRES form (--gres=gpu:1) that clusters rejecting --gpus need.
GRES_FOR_PREDICT = ["--set-resources", "predict:gpu=0", "predict:gres=gpu:1"]
RUN_TIMEOUT_S = 600
# outputs whose bytes legitimately differ between two runs: logs and timings, and the
# model files (torch.save names the archive after the temporary file); compared by content
NOT_BYTEWISE = ("logs", "benchmarks", "train")
TIMINGS = {"epoch_time_s", "images_per_s", "data_wait_fraction"}  # of each training epoch

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]


def command(workdir: Path, *args: str) -> list[str]:
    """The study in workdir, killed after RUN_TIMEOUT_S (the plugin can wait forever when
    the status command fails)."""
    return [
        *("timeout", "-k", "10", str(RUN_TIMEOUT_S)),
        *(sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)),
        *("--configfile", *map(str, CONFIGS)),
        *args,
    ]


def check(done: subprocess.CompletedProcess, args) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-5000:]}\n{done.stderr[-10000:]}"
        )
    return done


def snakemake(workdir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """Run the study in workdir; fail the test with the output on error."""
    cmd = command(workdir, *args)
    return check(subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env), args)


def planned_jobs(workdir: Path, env=None) -> Counter:
    """Job counts per rule from Snakemake's dry-run summary, through the SLURM profile."""
    out = snakemake(workdir, *SLURM_ARGS, "--dry-run", "--quiet", "rules", env=env)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return Counter()
    stats = text[text.index("Job stats:") :]
    return Counter(
        {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"}
    )


def scontrol_jobs(cluster) -> list[dict[str, str]]:
    """Every job the cluster knows (finished ones stay for MinJobAge, a day here)."""
    out = cluster.run(["scontrol", "show", "job", "--oneliner"]).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def jobs_run_inside(log: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of each Snakemake job a SLURM job's log shows being executed
    (`localrule`/`localcheckpoint` blocks: printed by the Snakemake process that srun starts in the job)."""
    ran = []
    for block in re.finditer(r"^local(?:rule|checkpoint) (\w+):\n((?:    .*\n)*)", log, re.M):
        wildcards = re.search(r"^    wildcards: (.*)$", block[2], re.M)
        ran.append((block[1], wildcards[1] if wildcards else ""))
    return ran


def minutes(limit: str) -> int:
    """SLURM's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.unavailable_reason()
    if reason is None and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        reason = "snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')"
    if reason:
        pytest.skip(f"no SLURM test cluster here: {reason}")
    try:
        slurm_cluster.install()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no SLURM test cluster here: installing SLURM and munge failed: {err}")
    running = slurm_cluster.SlurmCluster(gpus=1).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, request):
    """The tiny study run through SLURM, and the same study run locally: the session's
    run (tests/conftest.py), made meanwhile unless another module needed it first (the
    SLURM run spends most of its time between status checks). The local run leaves out
    tests/configs/slurm.yaml, which sets SLURM resources only. Returns both folders and
    the jobs Snakemake planned for the SLURM run."""
    slurm, logs = tmp_path_factory.mktemp("slurm"), tmp_path_factory.mktemp("slurm_output")
    planned = planned_jobs(slurm, env=cluster.env())
    args = (*SLURM_ARGS, *GRES_FOR_PREDICT)
    with (logs / "out.txt").open("w+") as out, (logs / "err.txt").open("w+") as err:
        slurm_run = subprocess.Popen(
            command(slurm, *args), cwd=slurm, stdout=out, stderr=err, env=cluster.env()
        )
        try:
            local = request.getfixturevalue("tiny_study")
        finally:
            slurm_run.wait()
            out.seek(0), err.seek(0)
            check(
                subprocess.CompletedProcess([], slurm_run.returncode, out.read(), err.read()), args
            )
    return slurm, local, planned


def test_every_job_ran_as_a_slurm_job_with_its_resources(cluster, runs):
    workdir, _, planned = runs
    config = {}
    for path in CONFIGS:
        for key, value in yaml.safe_load(path.read_text()).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    assert planned["train"] == 2 and planned["convert"] == 2 and planned["all"] == 1
    jobs = scontrol_jobs(cluster)
    assert len({job["JobName"] for job in jobs}) == 1  # one Snakemake run submitted them all
    ran_in: dict[tuple[str, str], str] = {}
    for job in jobs:
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job
        log = Path(job["StdOut"])
        assert log.is_relative_to(workdir / ".snakemake" / "slurm_logs"), log
        inside = jobs_run_inside(log.read_text())
        assert inside, f"SLURM job {job['JobId']} ran no Snakemake job:\n{log.read_text()}"
        for rule_job in inside:
            assert rule_job not in ran_in, f"{rule_job} ran twice"
            ran_in[rule_job] = job["JobId"]
        rules = {rule for rule, _ in inside}
        # train asks for a GPU with --gpus=1, predict with --gres=gpu:1, nothing else does
        assert ("train" in rules) == (job.get("TresPerJob") == "gres:gpu:1"), (rules, job)
        assert ("predict" in rules) == (job.get("TresPerNode") == "gres:gpu:1"), (rules, job)
        if len(inside) == 1:  # a job of its own: wall time, memory and CPUs of its rule
            (rule,) = rules
            asked = config["resources"][rule]
            assert minutes(job["TimeLimit"]) == asked["runtime_min"], (rule, job["TimeLimit"])
            assert f"mem={asked['mem_mb']}M" in job["TRES"], (rule, job["TRES"])
            fixed = rule in ("split", "evaluate", "figures")  # `threads: 1` in the rule
            threads = (
                1 if fixed else config["threads"]["figures" if rule == "case_figures" else rule]
            )
            assert f"cpu={threads}," in job["TRES"], (rule, job["TRES"])
    # every planned job but the target rule (run by Snakemake itself) ran inside SLURM
    assert Counter(rule for rule, _ in ran_in) == planned - Counter(all=1)
    # per-shard conversion and preprocessing share one submission
    for shard in ("shard-000", "shard-001"):
        convert, preprocess = (ran_in[(r, f"shard={shard}")] for r in ("convert", "preprocess"))
        assert convert == preprocess
    assert len(jobs) == planned.total() - 1 - planned["preprocess"]
    # nothing left to do, seen through the same profile
    assert planned_jobs(workdir, env=cluster.env()) == Counter()


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def assert_same_results(one: Path, other: Path) -> None:
    """Two runs of the same study wrote the same outputs: every file of results/ and
    private/ byte for byte, but for logs, timings and the model files, whose weights and
    recorded metrics are compared instead (timings aside)."""
    import pandas as pd
    import torch

    for top in ("results", "private"):
        ours, theirs = _files(one / top), _files(other / top)
        assert sorted(ours) == sorted(theirs), top
        differ = [
            name
            for name in ours
            if not name.startswith(NOT_BYTEWISE)
            and ours[name].read_bytes() != theirs[name].read_bytes()
        ]
        assert not differ, f"{top}: differ between the two runs: {differ}"
    metrics = "results/evaluate/metrics.json"
    assert (one / metrics).read_text() == (other / metrics).read_text()
    for fold in (0, 1):
        a, b = (
            torch.load(run / f"results/train/fold{fold}/model.pt", weights_only=False)
            for run in (one, other)
        )
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for name, tensor in a["state_dict"].items():
            assert torch.equal(tensor, b["state_dict"][name]), name
        assert a["settings"] == b["settings"] and a["epoch"] == b["epoch"]
        assert {k: v for k, v in a["metrics"].items() if k not in TIMINGS} == {
            k: v for k, v in b["metrics"].items() if k not in TIMINGS
        }
        curves = [
            pd.read_csv(run / f"results/train/fold{fold}/history.tsv", sep="\t")
            for run in (one, other)
        ]
        learned = [c for c in curves[0].columns if c not in TIMINGS]
        assert learned[:2] == ["fold", "epoch"] and "val_loss" in learned
        pd.testing.assert_frame_equal(curves[0][learned], curves[1][learned])


def test_results_equal_a_local_run(runs):
    assert_same_results(runs[0], runs[1])


def test_stop_ends_only_the_daemons_it_started(cluster):
    """A second cluster (own ports, no GPU) starts and stops beside the first one: its
    daemons are gone afterwards, the first cluster's still run and answer."""
    second = slurm_cluster.SlurmCluster(gpus=0).start()
    theirs = dict(second.pids)
    assert set(theirs) == {"munged", "slurmctld", "slurmd"}
    assert second.run(["sinfo", "-h", "-o", "%P"]).stdout.strip() == "radflow*"
    second.stop()
    assert not second.root.exists()
    for pid in theirs.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    for pid in cluster.pids.values():
        assert Path(f"/proc/{pid}").exists() and not _zombie(pid)
    assert cluster.sinfo_state() in ("idle", "mixed", "allocated")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return False


def test_default_profile_stays_local_and_the_slurm_profile_uses_slurm():
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert "executor" not in default and default["resources"]["gpu"] == 1
    assert slurm["executor"] == "slurm"
    assert slurm["groups"] == {"convert": "shard", "preprocess": "shard"}
