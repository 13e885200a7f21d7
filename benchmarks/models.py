"""What each model costs: every network the config can choose and the ablation's variants.

    python benchmarks/models.py [--configfile config/config.yaml ...] [--threads N]
        [--dims 2 3] [--shape2d 128 128] [--shape3d 28 28 28] [--batch 16] [--depths 10 18 ...]

For each residual network of every depth `model.depth` may take (config/schema.yaml) and
the plain variant of each of the ablation's depths (config `ablation:`), with the
config's other model settings (width, pooling, dropout), in 2D and 3D: parameters, FLOPs
per image (torch.utils.flop_counter), peak live tensor bytes in a training step and in
inference, latency of one image and training throughput at the training batch size
(radflow/efficiency.py says how each is measured). On the CPU with the given threads;
where CUDA is present, the same on the GPU with bf16 autocast and channels-last (2D), as
training runs. The last columns are the ratios of latency and throughput to the
residual network of the config's depth measured in the same run (the reference).

Defaults: the 2D shape of config/config.yaml (the demo, 128 x 128) and the 3D shape of
config/examples/adrenalmnist3d.yaml (28^3), the training batch size of the config.
The ablation's rule writes the same table for the study's shape into
results/ablation/efficiency.tsv.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import pandas as pd
import torch
import yaml

from radflow.config import schema_defaults
from radflow.efficiency import ModelSpec, efficiency_table, format_table, model_specs
from radflow.models import ModelSettings
from radflow.models.resnet import RESNETS
from radflow.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def _merged(paths) -> dict:
    """The config files layered over one another (later keys win, sections merged)."""
    config: dict = {}
    for path in paths:
        for key, value in (yaml.safe_load(Path(path).read_text()) or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="+", default=[REPO / "config" / "config.yaml"])
    parser.add_argument("--shape2d", type=int, nargs=2, default=None)
    parser.add_argument("--shape3d", type=int, nargs=3, default=(28, 28, 28))
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=(2, 3))
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args()

    config = _merged(args.configfile)
    base = ModelSettings.from_config(config.get("model"))
    ablation = {**schema_defaults("ablation"), **config.get("ablation", {})}
    batch = (
        args.batch
        or config.get("train", {}).get("batch_size")
        or schema_defaults("train")["batch_size"]
    )
    shape2d = args.shape2d or config.get("preprocess", {}).get("target_shape_px", [128, 128])
    if len(shape2d) != 2:
        shape2d = [128, 128]
    depths = args.depths or sorted(RESNETS)  # every depth model.depth may take
    specs = model_specs(base, depths, ["residual"])
    if "plain" in ablation["variants"]:
        specs += model_specs(base, [d for d in ablation["depths"] if d in depths], ["plain"])
    task = get_task(config.get("task", "classification"))
    devices: list = ["cpu"]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {where}; torch "
        f"{torch.__version__}; width {base.base_width}, pooling {base.pooling}; batch {batch}"
    )
    reference = ModelSpec(base).name  # the study's own network
    shapes = {2: [args.channels, *shape2d], 3: [args.channels, *args.shape3d]}
    for shape in (shapes[d] for d in args.dims):
        for device in devices:
            table = efficiency_table(
                task,
                specs,
                shape,
                batch_size=batch,
                threads=args.threads,
                device=device,
                repeats=args.repeats,
                min_seconds=args.min_seconds,
            )
            print(f"\n{len(shape) - 1}D, input {'x'.join(map(str, shape))}, {table['device'][0]}:")
            print(format_table(with_ratios(table, reference)))


def with_ratios(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Latency and throughput relative to the `reference` model's row of the same run."""
    rows = table[table["model"] == reference]
    ref = (rows if len(rows) else table).iloc[0]
    return table.assign(
        latency_vs_ref=(table["latency_ms"] / ref["latency_ms"]).round(2),
        throughput_vs_ref=(table["train_images_per_s"] / ref["train_images_per_s"]).round(2),
    ).drop(columns=["device", "batch_size"])


if __name__ == "__main__":
    main()
