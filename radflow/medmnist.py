"""MedMNIST `.npz` files as an images table: image files, a table and the official split.

MedMNIST (v2, https://medmnist.com) ships each data set as one `.npz` holding
``{train,val,test}_images`` and ``{train,val,test}_labels``. radflow reads images from
files listed in a table (`radflow.images`), so this writes:

- ``images/<split>/<split>_<index>.nii.gz`` for 3D sets (uint8, nominal 1 mm voxels:
  MedMNIST gives no spacing) or ``.png`` for 2D sets (grayscale, or RGB as shipped);
- ``images.csv``: patient_id, path (relative to the table), label;
- ``split.csv``: patient_id, split (train / val / test): MedMNIST's official split.

MedMNIST gives no patient identifiers, so each image is its own patient; its official
split was made by the source data sets' patients. Single-label sets only (a multi-label
set such as ChestMNIST has no single label column to classify).

    python scripts/medmnist_to_table.py ../shared/data/medmnist3d/adrenalmnist3d.npz \
        data/adrenalmnist3d
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from radflow.tables import write_tsv

SPLITS = ("train", "val", "test")


def convert_npz(npz_path: str | os.PathLike, out_dir: str | os.PathLike) -> pd.DataFrame:
    """Write the files above under `out_dir` and return the images table. Existing
    files of the same content are left as they are (a rerun changes nothing)."""
    import nibabel as nib
    from PIL import Image

    out = Path(out_dir)
    data = np.load(npz_path)
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in data]
    if missing:
        raise ValueError(f"{npz_path}: not a MedMNIST file (no {', '.join(missing)})")
    rows, split_rows = [], []
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ValueError(f"{npz_path}: {labels.shape[1]} labels per image (a multi-label "
                             "set); radflow's classification needs one label per image")  # fmt: skip
        labels = labels.reshape(len(labels))
        # 3D sets: (N, z, y, x); 2D sets: (N, y, x) or (N, y, x, 3) for colour
        volume = images.ndim == 4 and images.shape[-1] != 3
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            patient = f"{split}_{i:05d}"
            if volume:  # (z, y, x) -> NIfTI (x, y, z), 1 mm, identity orientation
                name = f"{patient}.nii.gz"
                path = folder / name
                if not path.exists():
                    nifti = nib.Nifti1Image(np.ascontiguousarray(image.T), np.eye(4))
                    nifti.header.set_xyzt_units("mm")
                    nib.save(nifti, path)
            else:
                name = f"{patient}.png"
                path = folder / name
                if not path.exists():
                    Image.fromarray(image).save(path)
            rows.append((patient, f"images/{split}/{name}", str(int(label))))
            split_rows.append((patient, split))
    table = pd.DataFrame(rows, columns=["patient_id", "path", "label"])
    write_tsv(table, out / "images.tsv")
    write_tsv(pd.DataFrame(split_rows, columns=["patient_id", "split"]), out / "split.tsv")
    return table
