"""What a model costs: parameters, FLOPs, memory, latency and throughput.

One row per model (`measure`): the network the study's task builds from a
`ModelSettings`, for one input shape. Used by `benchmarks/models.py` (every depth the
config can choose and the ablation's variants, 2D and 3D) and by the ablation's
`efficiency` rule (results/ablation/efficiency.tsv, in the report).

What each column means, and how it is measured:

* ``parameters``: trainable parameters.
* ``gflops_per_image``: floating-point operations of one forward pass of one image, as
  `torch.utils.flop_counter.FlopCounterMode` counts them: 2 x multiply-accumulates of
  convolutions and matrix products (a k^d convolution from Cin to Cout channels costs
  2 Cin Cout k^d per output voxel); normalisation, activations, pooling and the shortcut
  additions are not counted (they are a few % more).
* ``train_peak_mib`` / ``infer_peak_mib``: the peak of the bytes held by live tensors
  during one training step (forward, backward, AdamW update; weights, gradients,
  optimiser state and saved activations) and during one inference forward pass (weights
  and activations), both at the training batch size. On the CPU the bytes are counted
  by `LiveTensorBytes`, which sees every tensor an operator creates and when its
  storage is freed; the process's resident memory is higher (the allocator's caches,
  oneDNN's scratch buffers, the interpreter). On CUDA: `torch.cuda.max_memory_allocated`,
  the same notion as counted by PyTorch's allocator.
* ``latency_ms``: median wall time of one forward pass of one image (evaluation mode,
  no gradient) on `threads` CPU threads, or on the GPU (synchronised).
* ``train_images_per_s``: images per second of training steps at the training batch size.
* On CUDA the timings and memory are taken with the training's switches: bf16 autocast
  (fp16 where bf16 is missing) and channels-last for 2D, as `radflow.train` runs them.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from radflow.inference import memory_format
from radflow.models import ModelSettings

__all__ = ["EFFICIENCY_COLUMNS", "LiveTensorBytes", "ModelSpec", "flops_per_image", "measure"]

EFFICIENCY_COLUMNS = (
    "model",
    "variant",
    "depth",
    "dims",
    "input_shape",
    "parameters",
    "gflops_per_image",
    "train_peak_mib",
    "infer_peak_mib",
    "latency_ms",
    "train_images_per_s",
    "batch_size",
    "device",
    "precision",
)
_MIB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    """A network to measure: `settings` with their depth and residual switch."""

    settings: ModelSettings

    @property
    def variant(self) -> str:
        return "residual" if self.settings.residual else "plain"

    @property
    def name(self) -> str:
        return f"{self.variant}{self.settings.depth}"


def model_specs(
    base: ModelSettings, depths: Iterable[int], variants: Sequence[str] = ("residual",)
) -> list[ModelSpec]:
    """One spec per (variant, depth), the other settings (width, pooling...) `base`'s."""
    return [
        ModelSpec(replace(base, depth=depth, residual=variant == "residual"))
        for variant in variants
        for depth in depths
    ]


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storage created while it is active, and the
    peak. A storage is counted once (views and in-place results share it) and leaves
    the count when PyTorch frees it. `hold` adds tensors that existed before (weights,
    optimiser state), so the peak is that of everything a step needs."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)  # the storage's Python object lives as long as the storage
        if key in self._live or storage.nbytes() == 0:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t)
        return out


def flops_per_image(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of one image of `input_shape` (C, *spatial), counted by
    torch.utils.flop_counter (see the module docstring for what it counts)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def _optimiser(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def _batch(shape, batch, device, channels_last):
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=memory_format(len(shape) - 1))
    return x, torch.arange(batch, device=device) % 2


def _train_step(model, task, optimizer, x, y, autocast_dtype):
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = task.loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(run, device, held: Iterable[torch.Tensor]) -> int:
    """Peak live tensor bytes while `run()` runs (CPU: LiveTensorBytes; CUDA: the
    allocator's peak)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    tracker = LiveTensorBytes()
    tracker.hold(held)
    with tracker:
        run()
    return tracker.peak


def _timed(run, device, repeats: int, min_seconds: float) -> float:
    """Median seconds of `run()` over at least `repeats` runs and `min_seconds`."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def _measure_training(model, task, x, y, autocast_dtype, device, repeats, min_seconds):
    """(peak bytes, median seconds) of a training step; a warm-up step first creates
    the optimiser state. The optimiser is gone when this returns."""
    model.train()
    optimizer = _optimiser(model)
    _train_step(model, task, optimizer, x, y, autocast_dtype)

    def train_step():
        _train_step(model, task, optimizer, x, y, autocast_dtype)

    held = [*model.parameters(), *model.buffers(), x, y]
    held += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    peak = _peak_bytes(train_step, device, held)
    seconds = _timed(train_step, device, repeats, min_seconds)
    optimizer.zero_grad(set_to_none=True)
    return peak, seconds


def measure(
    task,
    spec: ModelSpec,
    input_shape: Sequence[int],
    *,
    batch_size: int,
    threads: int,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    min_seconds: float = 0.5,
) -> dict:
    """One row of EFFICIENCY_COLUMNS for `task`'s network of `spec` on images of
    `input_shape` (C, *spatial); see the module docstring."""
    device = torch.device(device)
    torch.set_num_threads(max(1, threads))
    on_cuda = device.type == "cuda"
    dims = len(input_shape) - 1
    autocast_dtype = None
    if on_cuda:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    channels_last = on_cuda  # as training runs on CUDA: channels_last(_3d)
    torch.manual_seed(0)
    model = task.build_model(spec.settings, in_channels=input_shape[0], spatial_dims=dims)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = flops_per_image(model, input_shape)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(dims))

    x, y = _batch(input_shape, batch_size, device, channels_last)
    train_peak, train_s = _measure_training(
        model, task, x, y, autocast_dtype, device, max(2, repeats // 2), min_seconds
    )

    # inference: forward passes without gradient
    model.eval()

    @torch.no_grad()
    def infer(batch):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model(batch)

    held = [*model.parameters(), *model.buffers(), x]
    infer_peak = _peak_bytes(lambda: infer(x), device, held)
    one, _ = _batch(input_shape, 1, device, channels_last)
    infer(one)  # warm-up
    latency = _timed(lambda: infer(one), device, repeats, min_seconds)
    return {
        "model": spec.name,
        "variant": spec.variant,
        "depth": spec.settings.depth,
        "dims": dims,
        "input_shape": "x".join(str(s) for s in input_shape),
        "parameters": parameters,
        "gflops_per_image": flops / 1e9,
        "train_peak_mib": train_peak / _MIB,
        "infer_peak_mib": infer_peak / _MIB,
        "latency_ms": 1e3 * latency,
        "train_images_per_s": batch_size / train_s,
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name(device) if on_cuda else f"cpu, {threads} threads",
        "precision": (str(autocast_dtype).removeprefix("torch.") if on_cuda else "float32")
        + (", channels_last" if channels_last else ""),
    }


def efficiency_table(
    task,
    specs: Iterable[ModelSpec],
    input_shape: Sequence[int],
    **kwargs,
) -> pd.DataFrame:
    """`measure` for every spec, one row each (EFFICIENCY_COLUMNS)."""
    rows = [measure(task, spec, input_shape, **kwargs) for spec in specs]
    return pd.DataFrame(rows, columns=list(EFFICIENCY_COLUMNS))


def write_efficiency(
    preprocessed_dirs,
    out_path,
    *,
    task_name: str,
    task_modules=(),
    model: Mapping,
    variants: Sequence[str],
    depths: Sequence[int],
    batch_size: int,
    device: str,
    threads: int,
) -> pd.DataFrame:
    """The ablation_efficiency stage: `efficiency_table` of every (variant, depth) of
    the ablation, config `model:` otherwise, for images of the preprocessed shards'
    shape, on the CPU with `threads` threads and, where config train.device resolves to
    a GPU, on it too. Written to `out_path` (TSV)."""
    from radflow.data import PreprocessedStore
    from radflow.inference import resolve_device
    from radflow.tables import write_tsv
    from radflow.tasks import get_task

    task = get_task(task_name, modules=task_modules)
    shape = PreprocessedStore(preprocessed_dirs).case_shape
    specs = model_specs(ModelSettings.from_config(model), depths, variants)
    devices = ["cpu"]
    if resolve_device(device).type == "cuda":
        devices.append(resolve_device(device))
    table = pd.concat(
        [
            efficiency_table(task, specs, shape, batch_size=batch_size, threads=threads, device=d)
            for d in devices
        ],
        ignore_index=True,
    )
    write_tsv(table, out_path)
    print(format_table(table))
    return table


def format_table(table: pd.DataFrame) -> str:
    """The efficiency table as aligned text (what benchmarks/models.py prints)."""
    shown = table.assign(
        parameters=table["parameters"].map("{:,}".format),
        gflops_per_image=table["gflops_per_image"].map("{:.3f}".format),
        train_peak_mib=table["train_peak_mib"].map("{:.1f}".format),
        infer_peak_mib=table["infer_peak_mib"].map("{:.1f}".format),
        latency_ms=table["latency_ms"].map("{:.2f}".format),
        train_images_per_s=table["train_images_per_s"].map("{:.1f}".format),
    )
    return shown.to_string(index=False)
