"""DICOM -> NIfTI conversion: radflow against dcm2niix on the same series, in one run.

    python benchmarks/convert.py [--workdir DIR] [--repeats 3] [--threads 1 N]
                                 [--rows 512 --cols 512 --slices 300]
                                 [--batch 50 --batch-rows 256 --batch-cols 256 --batch-slices 40]

Generates (deterministically, with pydicom) one CT-like series of --slices slices of
--rows x --cols int16 (air -1024 HU, a noisy body ellipse with lungs and bone, outside
the scan field the padding value) and a batch of --batch smaller series, then converts
each data set with
  - radflow: `convert_shard` on a shard table of the data set, in a fresh Python process
    (so that its peak memory is its own), with threads=T;
  - dcm2niix -z y (gzip level 6, like radflow's default) with the compressor it picks:
    without pigz on PATH its internal one (single-threaded), and, when pigz is installed,
    with pigz limited to T threads (a wrapper on PATH passes -p T).
Prints wall time (median of --repeats runs), peak memory (peak resident set size, summed
and RSS, summed over the process tree, sampled every 10 ms)
and the ratios radflow / dcm2niix and peak memory / size of the largest volume. Checks
that every output holds the same voxels as dcm2niix's (after reorienting both to RAS).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PADDING_HU = -2048  # value outside the reconstruction circle, as many scanners write


def ct_slice(rows: int, cols: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """One CT-like slice in HU (int16): air with a little noise, an elliptical body of
    soft tissue (40 HU, noise 15 HU) with two lungs (-850 HU), a spine and a ring of ribs
    (700-1200 HU) whose sizes change with z in [0, 1], padding outside the scan circle."""
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    hu = -1000 + rng.normal(0, 6, (rows, cols))
    body = (x / 0.8) ** 2 + (y / (0.55 + 0.05 * np.sin(3 * z))) ** 2 < 1
    hu[body] = 40 + rng.normal(0, 15, int(body.sum()))
    for side in (-1, 1):
        lung = ((x - side * 0.35) / 0.25) ** 2 + (y / (0.3 + 0.1 * z)) ** 2 < 1
        hu[lung & body] = -850 + rng.normal(0, 25, int((lung & body).sum()))
    spine = (x / 0.1) ** 2 + ((y - 0.35) / 0.1) ** 2 < 1
    hu[spine] = 700 + 300 * np.exp(-((x[spine] / 0.05) ** 2)) + rng.normal(0, 30, int(spine.sum()))
    ribs = np.abs((x / 0.72) ** 2 + (y / (0.48 + 0.05 * np.sin(3 * z))) ** 2 - 1) < 0.03
    hu[ribs & body] = 1200 + rng.normal(0, 40, int((ribs & body).sum()))
    hu[x**2 + y**2 > 1] = PADDING_HU
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def write_series(folder: Path, rows: int, cols: int, slices: int, seed: int) -> int:
    """Write one axial CT series (signed 16-bit stored values, intercept -1024 as GE
    writes them, files in shuffled order) to `folder`; returns the voxel count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = (generate_uid(entropy_srcs=[f"bench-{kind}-{seed}"]) for kind in "ab")
    order = rng.permutation(slices)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"bench-{seed}-{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "Bench^Patient", f"BENCH{seed:04d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.SeriesDescription = folder.name  # dcm2niix names its output by it (-f %d)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240101"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250.0, -250.0, -400.0 + 1.25 * k]
        ds.PixelSpacing = [500 / rows, 500 / cols]
        ds.SliceThickness = 1.25
        ds.KVP, ds.ConvolutionKernel = 120, "STANDARD"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (ct_slice(rows, cols, k / max(slices - 1, 1), rng) + 1024).tobytes()
        ds.save_as(folder / f"IM{order[k]:05d}.dcm", enforce_file_format=True)
    return rows * cols * slices


def write_batch(root: Path, n: int, rows: int, cols: int, slices: int) -> None:
    """`n` series of `rows` x `cols` x `slices`, one folder each (b000, b001, ...)."""
    for b in range(n):
        write_series(root / f"b{b:03d}", rows, cols, slices, seed=1000 + b)


def shard_table(root: Path, path: Path) -> None:
    """The private shard table radflow's convert stage reads: one unit per folder."""
    lines = ["series_pid\tmodality\tpath"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        lines += [f"ser-{folder.name}\tCT\t{f.relative_to(root).as_posix()}"
                  for f in sorted(folder.iterdir())]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ measuring
def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and its descendants, summed. PSS counts pages
    shared between them (forked workers, libraries) once, RSS once per process."""
    pss, rss, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pss, rss


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`: wall time (s) and the peaks of the summed PSS and RSS of its process
    tree, sampled every 10 ms (wait4's ru_maxrss would include the forking Python)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss, rss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    returncode = proc.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({returncode}):\n{output.decode()[-2000:]}")
    return {"wall_s": wall, "tree_pss": peak[0], "tree_rss": peak[1],
            "log": output.decode(errors="replace")}  # fmt: skip


def radflow_cmd(tsv: Path, root: Path, out: Path, threads: int, level: int) -> list[str]:
    code = (
        "import sys; from radflow.dicom.convert import convert_shard; "
        f"m = convert_shard({str(tsv)!r}, {str(root)!r}, {str(out)!r}, threads={threads}, "
        f"compression_level={level}, progress=False); "
        "sys.exit(int((m['status'] != 'ok').sum()))"
    )
    return [sys.executable, "-c", code]


def pigz_wrapper(folder: Path, threads: int) -> Path:
    """A folder holding `pigz` that runs the real pigz with -p `threads`."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "pigz"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("pigz")} -p {threads} "$@"\n')
    wrapper.chmod(0o755)
    return folder


def dcm2niix_env(with_pigz: bool, threads: int, work: Path) -> dict[str, str]:
    """Environment for dcm2niix: pigz limited to `threads` first on PATH, or no pigz
    reachable at all (then -z i and -z y both use dcm2niix's internal zlib)."""
    env = dict(os.environ)
    if with_pigz:
        env["PATH"] = f"{pigz_wrapper(work / f'pigz-p{threads}', threads)}{os.pathsep}{env['PATH']}"
    else:
        folders = env["PATH"].split(os.pathsep)
        env["PATH"] = os.pathsep.join(p for p in folders if not (Path(p) / "pigz").exists())
    return env


def dcm2niix_binary() -> str:
    candidate = Path(sys.executable).parent / "dcm2niix"
    found = str(candidate) if candidate.exists() else shutil.which("dcm2niix")
    if not found:
        sys.exit("dcm2niix not found: pip install dcm2niix")
    return found


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def same_voxels(ours: Path, reference: Path) -> bool:
    """Do two NIfTI files hold the same values at the same RAS-oriented voxels?"""
    a = nib.as_closest_canonical(nib.load(ours))
    b = nib.as_closest_canonical(nib.load(reference))
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a.get_fdata(dtype=np.float32), b.get_fdata(dtype=np.float32)))


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep data and outputs here (reused)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--sets", nargs="+", choices=["large", "batch"], default=["large", "batch"])
    parser.add_argument("--level", type=int, default=6, help="gzip level for both tools")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--batch-cols", type=int, default=256)
    parser.add_argument("--batch-slices", type=int, default=40)
    args = parser.parse_args()

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="radflow-bench-convert-")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
    dcm2niix = dcm2niix_binary()
    version = subprocess.run([dcm2niix, "--version"], capture_output=True, text=True).stdout
    has_pigz = shutil.which("pigz") is not None
    sets = {
        "large": (args.rows, args.cols, args.slices, 1),
        "batch": (args.batch_rows, args.batch_cols, args.batch_slices, args.batch),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}; dcm2niix {version.strip().splitlines()[-1]}; "
          f"pigz {'found: ' + shutil.which('pigz') if has_pigz else 'not installed'}")  # fmt: skip
    idle = measure([sys.executable, "-c", "import radflow.dicom.convert"])
    baseline = idle["tree_pss"]
    print(f"radflow's Python with its imports, no work: {_mib(baseline)} MiB PSS, "
          f"{idle['wall_s']:.2f} s")  # fmt: skip
    try:
        for name, (rows, cols, slices, count) in sets.items():
            if name not in args.sets:
                continue
            root = work / name / "dicom"
            marker = work / name / f"generated-{rows}x{cols}x{slices}x{count}"
            if not marker.exists():
                shutil.rmtree(work / name, ignore_errors=True)
                t0 = time.perf_counter()
                if count == 1:
                    write_series(root / "s000", rows, cols, slices, seed=1)
                else:
                    write_batch(root, count, rows, cols, slices)
                marker.touch()
                print(f"[{name}] generated in {time.perf_counter() - t0:.1f} s")
            tsv = work / name / "shard.tsv"
            shard_table(root, tsv)
            volume_bytes = rows * cols * slices * 2
            print(f"\n[{name}] {count} series of {cols} x {rows} x {slices} int16 "
                  f"({_mib(volume_bytes)} MiB per volume, {_mib(volume_bytes * count)} MiB in all)")  # fmt: skip
            runs: dict[str, list[dict]] = {}
            configs = [("dcm2niix -z i (internal zlib)", "internal", 1)]
            for t in args.threads:
                configs.append((f"radflow threads={t}", "radflow", t))
                if has_pigz:
                    configs.append((f"dcm2niix -z y, pigz -p {t}", "pigz", t))
            for _ in range(args.repeats):  # interleaved, so that load hits every tool alike
                for label, tool, t in configs:
                    out = fresh(work / name / "out" / label.split()[0] / f"{tool}-{t}")
                    if tool == "radflow":
                        result = measure(radflow_cmd(tsv, root, out, t, args.level))
                    else:
                        cmd = [dcm2niix, "-z", "i" if tool == "internal" else "y",
                               f"-{args.level}", "-f", "%d", "-o", str(out), str(root)]  # fmt: skip
                        result = measure(cmd, dcm2niix_env(tool == "pigz", t, work))
                    if tool == "pigz" and "pigz" not in result["log"].lower():
                        print(f"  warning: dcm2niix did not report using pigz:\n{result['log']}")
                    result["bytes"] = sum(f.stat().st_size for f in out.glob("*.nii.gz"))
                    result["out"] = out
                    runs.setdefault(label, []).append(result)
            # outputs agree: every radflow output against the internal dcm2niix output
            reference = runs["dcm2niix -z i (internal zlib)"][-1]["out"]
            agree = all(
                same_voxels(r[-1]["out"] / f"ser-{p.name}.nii.gz", reference / f"{p.name}.nii.gz")
                for label, r in runs.items() if label.startswith("radflow")
                for p in sorted(q for q in root.iterdir() if q.is_dir())
            )  # fmt: skip
            med = {k: {m: statistics.median(x[m] for x in r) for m in ("wall_s", "tree_pss",
                                                                       "tree_rss", "bytes")}
                   for k, r in runs.items()}  # fmt: skip
            print(
                f"{'':34s} {'wall s':>8s} {'peak PSS MiB':>13s} {'peak RSS MiB':>12s} "
                f"{'PSS/volume':>11s} {'out MiB':>8s}"
            )
            for label, m in med.items():
                print(f"{label:34s} {m['wall_s']:8.2f} {_mib(m['tree_pss']):>13s} "
                      f"{_mib(m['tree_rss']):>12s} {m['tree_pss'] / volume_bytes:11.2f} "
                      f"{m['bytes'] / 2**20:8.1f}")  # fmt: skip
            print(f"(median of {args.repeats}; all walls: " + "; ".join(
                f"{k}: " + "/".join(f"{x['wall_s']:.1f}" for x in r)
                for k, r in runs.items()) + ")")  # fmt: skip
            for t in args.threads:
                ours = med[f"radflow threads={t}"]
                # dcm2niix converts on one core whatever -p; pigz may use t cores
                refs = [k for k in med if "internal" in k or k.endswith(f"pigz -p {t}")]
                for ref in refs:
                    print(f"ratio radflow threads={t} / {ref}: wall {ours['wall_s'] / med[ref]['wall_s']:.2f}, "
                          f"peak PSS {ours['tree_pss'] / med[ref]['tree_pss']:.2f}")  # fmt: skip
                extra = (ours["tree_pss"] - baseline) / volume_bytes
                print(f"radflow threads={t}: peak PSS / volume {ours['tree_pss'] / volume_bytes:.2f}"
                      f" ({extra:.2f} without the interpreter baseline)")  # fmt: skip
            print(f"outputs hold the same voxels as dcm2niix's: {'yes' if agree else 'NO'}")
            if not agree:
                sys.exit(1)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
