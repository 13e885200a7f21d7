"""A throw-away single-node SLURM cluster on 127.0.0.1, for testing the SLURM profile.

Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (root and
apt-get needed), then starts munged (as user munge), slurmctld and slurmd in the foreground
as children of this process, with every key, socket, state file, config file and log under
one private temporary folder (nothing is written to /etc). Optionally the node gets fake
GPUs (a GRES backed by char devices like /dev/null) so that `gpu=1` jobs are scheduled.
`stop()` cancels the cluster's jobs and ends exactly the daemons it started, by PID.

Clients find the cluster through SLURM_CONF; `env()` also puts a folder of wrappers
(srun, sbatch, squeue, ...) first on PATH that set SLURM_CONF themselves, because the SLURM
executor plugin's job step calls `srun` with every SLURM_* variable but a few removed.

Library use (the SLURM test does this):
    cluster = SlurmCluster(gpus=1); cluster.start(); ...; cluster.stop()
Command line (for trying the profile by hand; the folder is printed by `start`):
    python tests/slurm_cluster.py start [--gpus N]   # prints the env to export
    python tests/slurm_cluster.py stop FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
REQUIRED = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "scontrol"]
CLIENTS = ["srun", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct"]
PARTITION = "radflow"
NODE = "localhost"


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED if _which(name) is None]


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can, possibly after installing)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    if os.geteuid() != 0:
        return "starting munged (as user munge) and slurmd needs root"
    if missing_binaries() and _which("apt-get") is None:
        return f"{', '.join(missing_binaries())} not installed and no apt-get to install them"
    return None


NET = [
    "-o",
    "Acquire::Retries=1",
    "-o",
    "Acquire::http::Timeout=20",
    "-o",
    "Acquire::https::Timeout=20",
]


def install(timeout: float = 300) -> None:
    """apt-get install the SLURM and munge packages when any binary is missing.

    Raises RuntimeError naming the failing command and its output's tail."""
    if not missing_binaries():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq", *NET],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *NET, *PACKAGES],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-1500:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{tail}")
    if missing_binaries():
        raise RuntimeError(f"still missing after apt-get install: {missing_binaries()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_memory_mb() -> int:
    """min(slurmd -C RealMemory, MemAvailable) less a margin: slurmd drains a node whose
    configured memory exceeds what it finds."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True).stdout
    real = int(out.split("RealMemory=")[1].split()[0])
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    avail = next(int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemAvail"))
    return max(256, min(real, avail) - 64)


class SlurmCluster:
    """One slurmctld + one slurmd (node `localhost`, partition `radflow`) and their munged.

    root: folder for everything (created with mkdtemp under /tmp when None; it must be
    traversable by user munge, so not inside a 0700 pytest temp folder).
    gpus: fake GPUs on the node (0: no GRES at all).
    """

    def __init__(self, root: Path | None = None, gpus: int = 1, min_job_age_s: int = 86400):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="radflow-slurm-"))
        self.root.chmod(0o755)
        self.gpus = gpus
        self.min_job_age_s = min_job_age_s
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin = self.root / "bin"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------------
    def _write_munge(self) -> list[str]:
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        key = mdir / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        mdir.chmod(0o755)  # clients reach the socket; the key itself is 0400
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.munge_socket = mdir / "munge.socket"
        return [
            _which("munged"),
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]

    def _write_slurm_conf(self) -> None:
        etc, state, spool, log = (self.root / d for d in ("etc", "state", "spool", "log"))
        for d in (etc, state, spool, log, self.root / "dev"):
            d.mkdir(exist_ok=True)
        cpus = os.cpu_count() or 1
        gres_node = ""
        if self.gpus:
            lines = []
            for k in range(self.gpus):
                # slurmd 22.05 drops GPUs without a device file; a char device with
                # /dev/null's numbers stands in for /dev/nvidiaK
                dev = self.root / "dev" / f"fakegpu{k}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
                lines.append(f"NodeName={NODE} Name=gpu File={dev}")
            (etc / "gres.conf").write_text("\n".join(lines) + "\n")
            gres_node = f" Gres=gpu:{self.gpus}"
        conf = f"""\
ClusterName=radflowtest
SlurmctldHost={NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge={self.min_job_age_s}
MailProg=/bin/true
InactiveLimit=0
KillWait=5
{"GresTypes=gpu" if self.gpus else ""}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_node_memory_mb()}{gres_node} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)
        self.bin.mkdir(exist_ok=True)
        for name in CLIENTS:
            real = _which(name)
            if real is None:
                continue
            wrapper = self.bin / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {real} "$@"\n')
            wrapper.chmod(0o755)

    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster (SLURM_CONF, wrappers first on PATH)."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.bin}:{os.environ.get('PATH', '')}",
        }

    # -- daemons ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as out:  # the child keeps a copy
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, not them
                env=self.env(),
                **kwargs,
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid
        (self.root / "pids.json").write_text(json.dumps(self.pids))

    def _wait_for(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}; "
                        f"see the logs under {self.root / 'log'} and {self.root / 'munge'}"
                    )
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}; logs: {self.root}")

    def sinfo_state(self) -> str:
        done = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld, slurmd; wait for an idle node."""
        try:
            munged = self._write_munge()
            (self.root / "log").mkdir(exist_ok=True)
            self._write_slurm_conf()
            self._spawn("munged", munged, user="munge", group="munge", extra_groups=[])
            self._wait_for("munged's socket", self.munge_socket.exists, timeout)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_for("an idle node", lambda: self.sinfo_state() == "idle", timeout)
        except BaseException:
            self.stop(remove=False)  # keep the logs the error names
            raise
        return self

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(), check=check)

    def stop(self, remove: bool = True) -> None:
        """Cancel this cluster's jobs, then SIGTERM (SIGKILL after 10 s) the daemons started
        here, by PID, slurmd first; remove the folder unless remove is False."""
        if "slurmctld" in self.pids:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            proc = self._procs.pop(name, None)
            _terminate(pid, proc)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    def attach(cls, root: Path) -> SlurmCluster:
        """The cluster whose folder is root (started from another process)."""
        cluster = cls.__new__(cls)
        cluster.root = Path(root)
        cluster.conf = cluster.root / "etc" / "slurm.conf"
        cluster.bin = cluster.root / "bin"
        cluster._procs = {}
        pids = cluster.root / "pids.json"
        cluster.pids = json.loads(pids.read_text()) if pids.exists() else {}
        return cluster


def _terminate(pid: int, proc: subprocess.Popen | None) -> None:
    """SIGTERM pid, SIGKILL after 10 s. Without the Popen (another process started it) the
    PID is only signalled while /proc names it munged, slurmctld or slurmd."""
    if proc is None:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return
        if name not in ("munged", "slurmctld", "slurmd"):
            return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="install if needed, start, print the env to export")
    start.add_argument("--gpus", type=int, default=1)
    stop = sub.add_parser("stop", help="stop the cluster started in FOLDER")
    stop.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "start":
        reason = unavailable_reason()
        if reason:
            parser.exit(1, f"cannot start a SLURM cluster here: {reason}\n")
        install()
        cluster = SlurmCluster(gpus=args.gpus).start()
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"export PATH={cluster.bin}:$PATH")
        print(f"# stop with: python {Path(__file__).name} stop {cluster.root}")
    else:
        SlurmCluster.attach(args.folder).stop()


if __name__ == "__main__":
    main()
