"""What makes a CPU training run differ between machines? One fold of a finished study
retrained under variants of the arithmetic, in one run, against a reference.

    python benchmarks/reproducibility.py [--results results] [--fold 0]

Each variant retrains the fold model from the study's own preprocessed arrays, split and
settings (read from `results/train/fold<k>/model.pt`) in a fresh process, then reports
how far its weights are from the reference's (max |difference|) and its validation and
test AUROC (the same metric the study's monitor uses). Variants:

- reference: the study's settings with 2 threads, the CPU's best instruction set;
- repeat: the reference again (same machine, same threads: must be bit-identical);
- 1 thread: the same arithmetic split over fewer threads (reduction order);
- AVX2 only: PyTorch's kernels and oneDNN limited to AVX2 (ATEN_CPU_CAPABILITY=avx2,
  ONEDNN_MAX_CPU_ISA=AVX2), what a CPU without AVX-512 (e.g. most AMD EPYC) runs;
- no oneDNN: convolutions through PyTorch's own CPU kernels.

Prints one row per variant and the spread of the test AUROC.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "reference": ({}, 2, True),
    "repeat": ({}, 2, True),
    "1 thread": ({}, 1, True),
    "AVX2 only": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 2, True),
    "no oneDNN": ({}, 2, False),
}


def worker(results: Path, fold: int, threads: int, mkldnn: bool, out: Path) -> None:
    import numpy as np
    import torch

    from radflow import conventions as C
    from radflow.data import PreprocessedStore
    from radflow.inference import load_model, predict_logits
    from radflow.metrics import roc_auc
    from radflow.split import fold_members
    from radflow.tables import read_tsv
    from radflow.tasks import get_task
    from radflow.train import TrainSettings, train_model

    torch.backends.mkldnn.enabled = mkldnn
    checkpoint = torch.load(results / "train" / f"fold{fold}" / "model.pt", weights_only=False)
    stored = dict(checkpoint["settings"])
    model_cfg, seed = stored.pop("model"), stored.pop("seed")
    settings = TrainSettings.from_config(stored, model_cfg, seed)
    task = get_task(checkpoint["task"], train=settings)
    store = PreprocessedStore(sorted((results / "preprocessed").glob("shard-*")))
    folds = read_tsv(results / "split" / "folds.tsv")
    folds = folds[folds[C.SERIES_PID].map(store.__contains__)]
    train_rows, val_rows, test_rows = fold_members(folds, fold)
    path = out / "model.pt"
    train_model(task, store.gather(list(train_rows[C.SERIES_PID])),
                train_rows[C.LABEL].to_numpy(), store.gather(list(val_rows[C.SERIES_PID])),
                val_rows[C.LABEL].to_numpy(), settings, threads=threads,
                checkpoint_path=path)  # fmt: skip
    model, best = load_model(path, task, in_channels=store.case_shape[0],
                             spatial_dims=len(store.case_shape) - 1,
                             device=torch.device("cpu"))  # fmt: skip
    aurocs = {}
    for name, rows in (("val", val_rows), ("test", test_rows)):
        scores = task.outputs(predict_logits(model, store.gather(list(rows[C.SERIES_PID])),
                                             torch.device("cpu"), 64)).numpy()  # fmt: skip
        aurocs[name] = roc_auc(rows[C.LABEL].to_numpy(), scores)
    weights = {k: v.numpy() for k, v in best["state_dict"].items()}
    np.savez(out / "weights.npz", **weights)
    (out / "result.json").write_text(json.dumps({**aurocs, "epoch": best["epoch"],
                                                 "capability": torch.backends.cpu.get_cpu_capability()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--fold", default=0, type=int)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        threads, mkldnn, out = args.worker
        worker(args.results, args.fold, int(threads), mkldnn == "1", Path(out))
        return
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores; study {args.results}, fold {args.fold}")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, (env, threads, mkldnn) in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_")
            out.mkdir()
            cmd = [sys.executable, __file__, "--results", str(args.results), "--fold",
                   str(args.fold), "--worker", str(threads), "1" if mkldnn else "0", str(out)]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, **env},
                           stdout=subprocess.DEVNULL)  # fmt: skip
            result = json.loads((out / "result.json").read_text())
            weights = dict(np.load(out / "weights.npz"))
            if reference is None:
                reference = weights
            # learned weights only (not the batch-norm running statistics and counters)
            diff = max(float(np.abs(weights[k].astype(np.float64) - reference[k]).max())
                       for k in reference if k.endswith((".weight", ".bias")))  # fmt: skip
            rows.append((name, threads, result["capability"], diff, result["epoch"],
                         result["val"], result["test"]))  # fmt: skip
            print(f"  {name}: done", flush=True)
    print("| variant | threads | kernels | max weight difference from reference | best epoch | "
          "val AUROC | test AUROC | test AUROC / reference |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, threads, capability, diff, epoch, val, test in rows:
        print(f"| {name} | {threads} | {capability} | {diff:.3g} | {epoch} | {val:.3f} | "
              f"{test:.3f} | {test / rows[0][6]:.3f} |")  # fmt: skip
    tests = [r[6] for r in rows]
    print(f"test AUROC spread over variants: {min(tests):.3f}-{max(tests):.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
