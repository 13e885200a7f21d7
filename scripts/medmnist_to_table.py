"""Turn a MedMNIST .npz into image files + an images table + its official split table.

    python scripts/medmnist_to_table.py NPZ OUT_DIR

writes OUT_DIR/images/..., OUT_DIR/images.tsv and OUT_DIR/split.tsv (see
radflow/medmnist.py); point data.images_table and split.table at them (e.g.
config/examples/adrenalmnist3d.yaml). Write it under data/ (never committed).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this workflow's radflow

from radflow.medmnist import convert_npz

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("npz", help="a MedMNIST .npz file, e.g. adrenalmnist3d_64.npz")
parser.add_argument("out_dir", help="folder to write, e.g. data/adrenalmnist3d_64")
args = parser.parse_args()
table = convert_npz(args.npz, args.out_dir)
counts = table["label"].value_counts().sort_index()
print(f"wrote {len(table)} images to {args.out_dir} (labels: "
      + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")")  # fmt: skip
