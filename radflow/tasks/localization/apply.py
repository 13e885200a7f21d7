"""Apply a trained localisation study to DICOM scans outside it: candidates in world mm.

    python -m radflow.tasks.localization.apply STUDY DICOM_DIR OUT_DIR \
        [--config config/examples/lung_ct_localization.yaml] [--device cpu]

STUDY is a study folder whose workflow has trained (results/train/fold<k>/model.pt and
results/preprocessed/plan.json). Every CT series under DICOM_DIR is converted as the
workflow converts (radflow.dicom: index, then dcm2niix as the engine), preprocessed with
the study's plan (its spacing) and the config's `preprocess:` keys, run through every
fold model (sliding windows, heatmap peaks, NMS) and the models' candidates merged as
the study's test ensemble. OUT_DIR/candidates.csv is in LUNA16's submission form
(seriesuid = the SeriesInstanceUID, coordX, coordY, coordZ in world mm, LPS, probability),
with OUT_DIR/seriesuids.csv listing the scans, so `python -m radflow.luna16` scores
them against LUNA16's or radflow.lidc's annotations (`make lidc-localization`).
The output names the user's own series: it is theirs, outside any study's results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from radflow import conventions as C


def _config(path: Path | None) -> dict:
    from radflow.config import schema_defaults

    cfg = yaml.safe_load(path.read_text()) if path else {}
    cfg = cfg or {}
    return {
        "preprocess": {**schema_defaults("preprocess"), **(cfg.get("preprocess") or {})},
        "localization": cfg.get("localization") or {},
    }


def apply_study(study: Path, dicom_dir: Path, out_dir: Path, *, config: Path | None = None,
                device: str = "cpu", progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Candidates of every series under `dicom_dir` (module docstring); writes
    `out_dir`/candidates.csv and seriesuids.csv (every series found) and returns the
    candidates."""
    import nibabel as nib
    import pydicom

    from radflow.dicom.convert import convert_shard
    from radflow.dicom.index import build_index
    from radflow.files import list_files
    from radflow.inference import load_model, resolve_device
    from radflow.plan import read_plan
    from radflow.tables import atomic_path
    from radflow.tasks import get_task
    from radflow.tasks.localization.centres import merge_candidates
    from radflow.tasks.localization.task import detect
    from radflow.volumes import VolumeSettings, preprocess_volume

    models = sorted(Path(study).glob("results/train/fold*/model.pt"))
    plan_path = Path(study) / "results" / "preprocessed" / "plan.json"
    if not models or not plan_path.is_file():
        raise FileNotFoundError(f"{study}: no trained fold models (results/train/fold*/model.pt) "
                                "or no results/preprocessed/plan.json; run the study first")  # fmt: skip
    cfg = _config(config)
    task = get_task("localization", options=cfg["localization"])
    settings = VolumeSettings.from_config(cfg["preprocess"])
    plan = read_plan(plan_path)
    key = b"radflow-apply-" + bytes(18)
    pseudo = C.Pseudonyms(key)
    uid_of_pid = {}
    for rel in list_files(dicom_dir):
        try:
            ds = pydicom.dcmread(Path(dicom_dir) / rel, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: the index quarantines it
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            uid_of_pid[pseudo("ser", uid)] = uid
    if not uid_of_pid:
        raise ValueError(f"{dicom_dir}: no DICOM series found")
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        labels = work / "labels.csv"
        pd.DataFrame({"SeriesInstanceUID": sorted(uid_of_pid.values()), "label": "1"}).to_csv(
            labels, index=False)  # fmt: skip
        index = build_index(dicom_dir, labels, label_key="SeriesInstanceUID", key=key, n_shards=1,
                            progress=progress)  # fmt: skip
        index.write(work / "index", work / "private")
        name = C.shard_name(0)
        manifest = convert_shard(work / "private" / C.SHARD_INDEX_DIR / f"{name}.tsv", dicom_dir,
                                 work / "nifti", progress=progress)  # fmt: skip
        ok = manifest[manifest[C.STATUS] == C.STATUS_OK]
        loaded = [load_model(path, task, in_channels=int(plan["n_channels"]), spatial_dims=3,
                             device=dev)[0] for path in models]  # fmt: skip
        for pid in ok[C.SERIES_PID]:
            image = nib.load(work / "nifti" / f"{pid}{C.NIFTI_SUFFIX}")
            volume = preprocess_volume(np.asarray(image.get_fdata(dtype=np.float32)), image.affine,
                                       "CT", tuple(plan["target_spacing_mm"]), settings)  # fmt: skip
            groups = [detect(m, volume.image, volume.geometry, task.settings, device=dev)
                      for m in loaded]  # fmt: skip
            merged = merge_candidates(groups, task.settings.nms_distance_mm)
            for p, s in zip(merged["points_mm"], merged["scores"], strict=True):
                rows.append((uid_of_pid.get(pid, pid), *p, s))
            if progress:
                print(f"{uid_of_pid.get(pid, pid)}: {len(merged['scores'])} candidates",
                      file=sys.stderr)  # fmt: skip
    table = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
    with atomic_path(out_dir / "candidates.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_dir / "seriesuids.csv") as tmp:  # the scans scored (LUNA16's form)
        pd.DataFrame({"seriesuid": sorted(uid_of_pid.values())}).to_csv(tmp, index=False)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radflow.tasks.localization.apply",
        description="Candidates (LUNA16's form, world mm) of a trained localisation study "
        "on DICOM scans outside it.",
    )
    parser.add_argument("study", type=Path, help="the study folder (results/train/...)")
    parser.add_argument("dicom_dir", type=Path, help="a folder of DICOM series")
    parser.add_argument("out_dir", type=Path, help="where candidates.csv is written")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the study's config file (its preprocess: and localization: keys)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        table = apply_study(args.study, args.dicom_dir, args.out_dir, config=args.config,
                            device=args.device)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(table)} candidates in {table['seriesuid'].nunique()} series: "
          f"{args.out_dir / 'candidates.csv'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
