"""DICOM -> NIfTI conversion: radflow's convert stage against dcm2niix alone, in one run.

    python benchmarks/convert.py [--workdir DIR] [--repeats 3] [--threads 1 N]
                                 [--sets large batch real] [--level 6]
                                 [--rows 512 --cols 512 --slices 300]
                                 [--batch 50 --batch-rows 256 --batch-cols 256 --batch-slices 40]
                                 [--real ../shared/data/real_dicom]

Data sets (each skipped with a note when empty or absent):
  - large: one CT-like series of --slices slices of --rows x --cols int16, generated
    deterministically with pydicom (air, a noisy body ellipse with lungs and bone, the
    padding value outside the scan field), one file per slice in shuffled order;
  - batch: --batch smaller series like it (--batch 0 skips it);
  - real: the scanner corpus at --real (default ../shared/data/real_dicom beside the
    repository; read in place, never copied): GE, Philips, Siemens mosaic/XA30 MR with
    4D series (fMRI, diffusion, ASL), multi-echo, and several transfer syntaxes.
For each data set the script first runs radflow's index stage as the workflow does
(`build_index` with a labels table keyed by SeriesInstanceUID, every series labelled,
`shards: auto`, then `IndexResult.write`), in a fresh process whose time and memory are
printed but are not part of the comparison. Then, --repeats times and interleaved (so that
background load hits every tool alike), it converts the whole data set with
  - radflow: one fresh Python process that calls `convert_shard` on every shard table in
    turn, with threads=T (T from --threads) and gzip level --level; its process tree
    includes the dcm2niix that convert_shard runs per unit and any worker processes;
  - dcm2niix -z y -<level> -f %s_%j over the whole tree (one process), with the
    compressor it picks: pigz limited to T threads (a wrapper on PATH passes -p T) when
    pigz is installed, and always its internal compressor (single-threaded; pigz hidden
    from PATH). The output says which ran.
Measured per tool: wall time from start to exit (median of the repeats) and peak memory:
the peak, sampled every 10 ms, of the PSS and of the RSS summed over the process tree
(PSS counts pages shared between processes once, RSS once per process; a child caught
between vfork and exec, which still shares its parent's memory, is not counted twice). Also measured:
an idle Python that only imports radflow.dicom.convert (the interpreter baseline, ~80-100
MiB, which dominates radflow's peak on small series).
Printed ratios radflow / dcm2niix (targets: <= 1.2 for wall time and for peak memory):
wall time; peak PSS and RSS; and the same peaks with the idle interpreter's subtracted
from radflow's ("-idle"), i.e. the memory the conversion itself adds. Correctness: every
unit radflow converts must hold the same values at the same RAS-oriented voxels (4D
included) as one of dcm2niix's outputs, matched by shape and voxels; a unit that equals
one volume of a dcm2niix 4D output instead (the Philips isotropic trace, which dcm2niix
over the whole series appends to its "_ADC" file and radflow makes a unit of its own) is
listed as such; units that radflow converts with its own reader (manifest route
"radflow", where dcm2niix is known to be wrong) are listed but may differ. Exits 1 when a
dcm2niix-route unit matches nothing or a synthetic unit fails or differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from radflow import conventions as C
from radflow.files import list_files

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real_dicom"
KEY = b"radflow-benchmark-key-0123456789"  # pseudonymisation key of the benchmark's index
LABEL_KEY = "SeriesInstanceUID"

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


# ------------------------------------------------------------------ the index
def write_labels(root: Path, path: Path) -> int:
    """A labels table keyed by SeriesInstanceUID with every series of `root` positive;
    returns the number of series."""
    uids: set[str] = set()
    for rel in list_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(root / rel, stop_before_pixels=True, force=True,
                                     specific_tags=[LABEL_KEY])  # fmt: skip
        except Exception:  # not DICOM: the index quarantines it
            continue
        uid = str(ds.get(LABEL_KEY, "")).strip()
        if uid:
            uids.add(uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{LABEL_KEY}\tlabel\n" + "".join(f"{u}\t1\n" for u in sorted(uids)))
    return len(uids)


def index_cmd(root: Path, labels: Path, folder: Path, threads: int) -> list[str]:
    """radflow's index stage as scripts/index.py runs it (shards: auto): the shard tables
    land in `folder`/private/index/shard-NNN.tsv."""
    code = (
        "import sys; from radflow import conventions as C; "
        "from radflow.dicom.index import build_index; from radflow.files import list_files; "
        "root, labels, folder, threads = sys.argv[1:5]; "
        "n = C.auto_shard_count(len(list_files(root))); "
        f"r = build_index(root, labels, label_key={LABEL_KEY!r}, key={KEY!r}, n_shards=n, "
        "threads=int(threads), progress=False); "
        "r.write(folder + '/results', folder + '/private'); print(r.summary_text())"
    )
    return [sys.executable, "-c", code, str(root), str(labels), str(folder), str(threads)]


def radflow_cmd(tsvs: list[Path], root: Path, out: Path, threads: int, level: int) -> list[str]:
    """One Python process converting every shard table in turn, each into out/<shard>."""
    code = (
        "import sys; from pathlib import Path; from radflow.dicom.convert import convert_shard\n"
        "root, out, threads, level, *tsvs = sys.argv[1:]\n"
        "for tsv in tsvs:\n"
        "    convert_shard(tsv, root, Path(out) / Path(tsv).stem, threads=int(threads),\n"
        "                  compression_level=int(level), progress=False)\n"
    )
    return [sys.executable, "-c", code, str(root), str(out), str(threads), str(level),
            *map(str, tsvs)]  # fmt: skip


# ------------------------------------------------------------------ measuring
def _vm(pid: int) -> tuple[str, str, str]:
    """(executable, vsize, rss) of a process, from /proc: equal for two processes that
    share one address space."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return os.readlink(f"/proc/{pid}/exe"), fields[20], fields[21]


def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and its descendants, summed. PSS counts pages
    shared between them (forked workers, libraries) once, RSS once per process. A child
    caught between vfork and exec (Python starts dcm2niix that way) still runs in its
    parent's address space and would report the parent's memory a second time: a child
    with its parent's executable, virtual size and resident size is skipped."""
    pss, rss, stack = 0, 0, [(pid, None)]
    while stack:
        p, parent_vm = stack.pop()
        try:
            vm = _vm(p)
            if vm != parent_vm:
                with open(f"/proc/{p}/smaps_rollup") as fh:
                    for line in fh:
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1]) * 1024
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack += [(int(c), vm) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return pss, rss


def measure(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> dict:
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
    log = output.decode(errors="replace")
    if check and returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({returncode}):\n{log[-2000:]}")
    return {"wall_s": wall, "pss": peak[0], "rss": peak[1], "log": log, "rc": returncode}


def pigz_wrapper(folder: Path, threads: int) -> Path:
    """A folder holding `pigz` that runs the real pigz with -p `threads`."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "pigz"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("pigz")} -p {threads} "$@"\n')
    wrapper.chmod(0o755)
    return folder


def dcm2niix_env(with_pigz: bool, threads: int, work: Path) -> dict[str, str]:
    """Environment for dcm2niix: pigz limited to `threads` first on PATH, or no pigz
    reachable at all (then -z y uses dcm2niix's internal, single-threaded compressor)."""
    env = dict(os.environ)
    if with_pigz:
        env["PATH"] = f"{pigz_wrapper(work / f'pigz-p{threads}', threads)}{os.pathsep}{env['PATH']}"
    else:
        folders = env["PATH"].split(os.pathsep)
        env["PATH"] = os.pathsep.join(p for p in folders if not (Path(p) / "pigz").exists())
    return env


def dcm2niix_binary() -> str:
    """The same binary radflow runs (radflow.dicom.engine.dcm2niix_binary)."""
    candidate = Path(sys.executable).parent / "dcm2niix"
    found = str(candidate) if candidate.exists() else shutil.which("dcm2niix")
    if not found:
        sys.exit("dcm2niix not found: pip install dcm2niix")
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------- correctness
def _digest(data: np.ndarray) -> tuple[tuple[int, ...], str]:
    return data.shape, hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()


def voxel_keys(path: Path) -> tuple[tuple, list[tuple]]:
    """(shape, hash of the values) of a NIfTI reoriented to RAS, and the same for each
    volume of a 4D image (empty for 3D)."""
    data = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    volumes = [_digest(data[..., v]) for v in range(data.shape[3])] if data.ndim == 4 else []
    return _digest(data), volumes


def compare(radflow_out: Path, dcm2niix_out: Path) -> dict:
    """Match every unit radflow converted to a dcm2niix output by shape and voxels: the
    whole image, or else one volume of a 4D output (dcm2niix over a whole series writes
    e.g. a Philips isotropic trace as the last volume of its "_ADC" file, which radflow
    makes a unit of its own)."""
    images: dict[tuple, list[str]] = {}
    volumes: dict[tuple, str] = {}
    for nii in sorted(dcm2niix_out.rglob("*.nii.gz")):
        whole, parts = voxel_keys(nii)
        images.setdefault(whole, []).append(nii.name)
        for v, key in enumerate(parts):
            volumes.setdefault(key, f"volume {v} of a {whole[0]} output")
    manifests = [pd.read_csv(m, sep="\t", dtype=str, keep_default_na=False)
                 for m in sorted(radflow_out.glob(f"*/{C.MANIFEST}"))]  # fmt: skip
    manifest = pd.concat(manifests, ignore_index=True) if manifests else pd.DataFrame()
    used: set[tuple] = set()
    result = {"units": len(manifest), "failed": [], "matched": 0, "as_volume": [],
              "unmatched": [], "dcm2niix_outputs": sum(map(len, images.values()))}  # fmt: skip
    for row in manifest.itertuples(index=False):
        if row.status != C.STATUS_OK:
            result["failed"].append((row.series_pid, row.reason))
            continue
        key, _ = voxel_keys(next(radflow_out.glob(f"*/{row.series_pid}{C.NIFTI_SUFFIX}")))
        if key in images:
            result["matched"] += 1
            used.add(key)
        elif key in volumes:
            result["as_volume"].append((row.series_pid, row.route, key[0], volumes[key]))
        else:
            result["unmatched"].append((row.series_pid, row.route, key[0]))
    result["dcm2niix_unused"] = sum(len(v) for k, v in images.items() if k not in used)
    return result


# -------------------------------------------------------------------- printing
def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def report(name: str, runs: dict[str, list[dict]], idle: dict, repeats: int) -> None:
    med = {k: {m: statistics.median(x[m] for x in r) for m in ("wall_s", "pss", "rss", "bytes")}
           for k, r in runs.items()}  # fmt: skip
    width = max(len(k) for k in [*med, "idle baseline"]) + 2
    print(f"{'[' + name + '] tool':{width}s} {'wall s':>8s} {'peak PSS MiB':>13s} "
          f"{'peak RSS MiB':>13s} {'out MiB':>8s}")  # fmt: skip
    for label, m in med.items():
        print(f"{label:{width}s} {m['wall_s']:8.2f} {_mib(m['pss']):>13s} {_mib(m['rss']):>13s} "
              f"{m['bytes'] / 2**20:8.1f}")  # fmt: skip
    print(f"{'idle baseline':{width}s} {idle['wall_s']:8.2f} {_mib(idle['pss']):>13s} "
          f"{_mib(idle['rss']):>13s}   (python -c 'import radflow.dicom.convert', no work)")  # fmt: skip
    print(f"(wall and peaks: median of {repeats}; all walls: " + "; ".join(
        f"{k}: " + "/".join(f"{x['wall_s']:.2f}" for x in r) for k, r in runs.items()) + ")")  # fmt: skip
    print(f"ratios radflow / dcm2niix, target <= 1.20 each; '-idle': radflow's peak minus the "
          f"idle baseline's ({_mib(idle['pss'])} MiB PSS, {_mib(idle['rss'])} MiB RSS)")  # fmt: skip
    head = f"{'':{2 * width + 3}s} {'wall':>6s} {'PSS':>6s} {'RSS':>6s} {'PSS-idle':>9s} {'RSS-idle':>9s}"
    print(head)
    for ours in (k for k in med if k.startswith("radflow")):
        t = ours.split("threads=")[1]
        for ref in (k for k in med if k.startswith("dcm2niix")):
            if "pigz" in ref and not ref.endswith(f"pigz -p {t}"):
                continue  # radflow with T threads against pigz with T threads
            a, b = med[ours], med[ref]
            print(f"{ours:{width}s} / {ref:{width}s} {a['wall_s'] / b['wall_s']:6.2f} "
                  f"{a['pss'] / b['pss']:6.2f} {a['rss'] / b['rss']:6.2f} "
                  f"{(a['pss'] - idle['pss']) / b['pss']:9.2f} "
                  f"{(a['rss'] - idle['rss']) / b['rss']:9.2f}")  # fmt: skip


# ------------------------------------------------------------------------ main
def prepare(name: str, args: argparse.Namespace, work: Path) -> Path | None:
    """The DICOM root of a data set (generated if synthetic), or None to skip it."""
    if name == "real":
        root = args.real.resolve()
        if not root.is_dir():
            print(f"\n[real] skipped: no corpus at {root} (--real PATH)")
            return None
        files = [root / rel for rel in list_files(root)]
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"\n[real] {root}: {len(files)} files, {mib:.0f} MiB (read in place)")
        return root
    if name == "large":
        rows, cols, slices, count = args.rows, args.cols, args.slices, 1
    else:
        rows, cols, slices = args.batch_rows, args.batch_cols, args.batch_slices
        count = args.batch
    if count < 1 or rows < 1 or cols < 1 or slices < 1:
        print(f"\n[{name}] skipped: empty data set ({count} series of {rows}x{cols}x{slices})")
        return None
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
        print(f"\n[{name}] generated in {time.perf_counter() - t0:.1f} s")
    mib = rows * cols * slices * 2 / 2**20
    print(f"\n[{name}] {count} series of {cols} x {rows} x {slices} int16 "
          f"({mib:.0f} MiB per volume, {mib * count:.0f} MiB in all)")  # fmt: skip
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep data and outputs here (reused)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--sets", nargs="+", choices=["large", "batch", "real"],
                        default=["large", "batch", "real"])  # fmt: skip
    parser.add_argument("--level", type=int, default=6, help="gzip level for both tools")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50, help="0 skips the batch data set")
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--batch-cols", type=int, default=256)
    parser.add_argument("--batch-slices", type=int, default=40)
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL,
                        help="scanner DICOM corpus, read in place (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="radflow-bench-convert-")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
    dcm2niix = dcm2niix_binary()
    version = subprocess.run([dcm2niix, "--version"], capture_output=True, text=True).stdout
    pigz = shutil.which("pigz")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores (os.cpu_count); "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"dcm2niix: {dcm2niix} {version.strip().splitlines()[-1]}")
    print(f"dcm2niix -z y compressor: {'pigz ' + pigz + ' (-p T), and internal with pigz hidden' if pigz else 'internal (single-threaded): pigz not installed'}")  # fmt: skip
    idles = [measure([sys.executable, "-c", "import radflow.dicom.convert"])
             for _ in range(max(1, args.repeats))]  # fmt: skip
    idle = {m: statistics.median(x[m] for x in idles) for m in ("wall_s", "pss", "rss")}
    failed = False
    try:
        for name in ("large", "batch", "real"):
            if name not in args.sets:
                continue
            root = prepare(name, args, work)
            if root is None:
                continue
            n_series = write_labels(root, work / name / "labels.tsv")
            folder = fresh(work / name / "index")
            ix = measure(index_cmd(root, work / name / "labels.tsv", folder, max(args.threads)))
            tsvs = sorted((folder / "private" / C.SHARD_INDEX_DIR).glob("*.tsv"))
            print(f"radflow index (build_index, {n_series} series labelled, threads="
                  f"{max(args.threads)}; not compared): {ix['wall_s']:.2f} s, peak PSS "
                  f"{_mib(ix['pss'])} MiB, RSS {_mib(ix['rss'])} MiB, {len(tsvs)} shard tables")  # fmt: skip
            print("  " + ix["log"].strip().replace("\n", "\n  "))

            configs = []  # (label, tool, threads)
            for t in args.threads:
                configs.append((f"radflow convert threads={t}", "radflow", t))
            configs.append(("dcm2niix -z y internal zlib", "internal", 1))
            if pigz:
                configs += [(f"dcm2niix -z y pigz -p {t}", "pigz", t) for t in args.threads]
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeats):  # interleaved, so that load hits every tool alike
                for label, tool, t in configs:
                    out = fresh(work / name / "out" / f"{tool}-{t}")
                    if tool == "radflow":
                        result = measure(radflow_cmd(tsvs, root, out, t, args.level))
                    else:
                        cmd = [dcm2niix, "-z", "y", f"-{args.level}", "-f", "%s_%j",
                               "-o", str(out), str(root)]  # fmt: skip
                        result = measure(cmd, dcm2niix_env(tool == "pigz", t, work), check=False)
                        if not any(out.glob("*.nii.gz")):
                            raise RuntimeError(f"dcm2niix wrote nothing:\n{result['log'][-2000:]}")
                        if tool == "pigz" and "pigz" not in result["log"].lower():
                            print("  warning: dcm2niix did not report using pigz")
                    result["bytes"] = sum(f.stat().st_size for f in out.rglob("*.nii.gz"))
                    result["out"] = out
                    runs.setdefault(label, []).append(result)
            rc = {r[-1]["rc"] for k, r in runs.items() if k.startswith("dcm2niix")}
            if rc != {0}:
                print(f"(dcm2niix exit status {sorted(rc)}: it skipped files it cannot convert)")
            report(name, runs, idle, args.repeats)

            reference = runs["dcm2niix -z y internal zlib"][-1]["out"]
            for label, r in runs.items():
                if not label.startswith("radflow"):
                    continue
                c = compare(r[-1]["out"], reference)
                ok = c["units"] - len(c["failed"])
                print(f"{label}: {c['units']} units, {ok} converted, {len(c['failed'])} failed; "
                      f"{c['matched']} of {ok} hold the same RAS voxels as a whole dcm2niix "
                      f"output, {len(c['as_volume'])} as one volume of one "
                      f"({c['dcm2niix_outputs']} dcm2niix outputs, {c['dcm2niix_unused']} "
                      "not matched whole by any radflow unit)")  # fmt: skip
                for pid, route, shape, where in c["as_volume"]:
                    print(f"  {pid} (route {route}, shape {shape}) = {where}")
                for pid, reason in c["failed"]:
                    print(f"  failed {pid}: {reason}")
                for pid, route, shape in c["unmatched"]:
                    why = "radflow's reader, may differ" if route == "radflow" else "WRONG"
                    print(
                        f"  no dcm2niix output matches {pid} (route {route}, shape {shape}): {why}"
                    )
                if any(route != "radflow" for _, route, _ in c["unmatched"]):
                    failed = True
                if name != "real" and (c["failed"] or c["matched"] != c["units"]):
                    failed = True
    finally:
        if tmp is not None:
            tmp.cleanup()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
