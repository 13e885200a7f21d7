"""Training one model: one loop a reader can hold in their head.

data -> augment -> forward -> loss -> backward -> step -> schedule, then validate, log a
history row, keep the best checkpoint. Device, precision and memory-format switches are
decided once at the top of `train_model`.

Reproducibility: with the same seed, data and thread count a CPU run gives the same
weights (batch order and augmentation come from seeded generators; deterministic
algorithms are requested). On CUDA, mixed precision and cuDNN autotuning trade bitwise
repeatability for speed, as usual.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from radflow.augment import AugmentSettings, augment_batch
from radflow.config import check_keys, schema_defaults
from radflow.data import BatchIterator
from radflow.inference import memory_format, predict_logits, resolve_device, to_device
from radflow.models import ModelSettings
from radflow.tables import atomic_path, read_tsv

_DEFAULTS = schema_defaults("train")  # config/schema.yaml is the one place defaults live


@dataclass(frozen=True)
class TrainSettings:
    """Config `train:` (with `augment`), the study `seed` and config `model:`; every
    default is the schema's (config/schema.yaml)."""

    epochs: int = _DEFAULTS["epochs"]
    batch_size: int = _DEFAULTS["batch_size"]
    learning_rate: float = _DEFAULTS["learning_rate"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    warmup_epochs: float = _DEFAULTS["warmup_epochs"]
    label_smoothing: float = _DEFAULTS["label_smoothing"]
    seed: int = schema_defaults()["seed"]
    device: str = _DEFAULTS["device"]  # auto | cpu | cuda | cuda:N
    mixed_precision: bool = _DEFAULTS["mixed_precision"]  # CUDA: bf16, else fp16 + scaling
    channels_last: bool = _DEFAULTS["channels_last"]  # CUDA only
    compile: bool = _DEFAULTS["compile"]
    eval_batch_size: int = _DEFAULTS["eval_batch_size"]
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    model: ModelSettings = field(default_factory=ModelSettings)

    @classmethod
    def from_config(cls, train_cfg: dict, model_cfg: dict, seed: int) -> TrainSettings:
        """From config `train:`, `model:` and `seed`; missing keys take the schema's
        defaults, unknown ones are an error naming them."""
        cfg = dict(train_cfg)
        augment = AugmentSettings.from_config(cfg.pop("augment", {}))
        check_keys(cls, {**cfg, "seed": seed}, "train")
        model = ModelSettings.from_config(model_cfg)
        return cls(**cfg, augment=augment, model=model, seed=seed)


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


def _batch_of_one_trains(model: torch.nn.Module, case_shape) -> bool:
    """Whether `model` can take a training step on a batch of one case of `case_shape`:
    a dry run on PyTorch's meta device (shapes only: no arithmetic, no change to the
    model or to any random state) through batch norms in training mode, which refuse a
    single value per channel."""
    import copy

    dry = copy.deepcopy(model).to("meta").train()
    try:
        with torch.no_grad():
            dry(torch.empty((1, *case_shape), device="meta"))
    except ValueError:
        return False
    return True


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class ArrayData:
    """Training cases held as arrays (the grid layout: classification): every training
    case once per epoch in a seeded shuffle, augmented on the device after the copy;
    validation on every validation case.

    Images: (N, C, *spatial) arrays (float16/32, memory maps allowed); targets: (N,) ints.
    """

    def __init__(self, train_images, train_targets, val_images, val_targets, settings):
        self.train_images, self.train_targets = train_images, train_targets
        self.val_images, self.val_targets = val_images, val_targets
        self.batch_size = settings.batch_size
        self.augment_settings = settings.augment
        self.in_channels = train_images.shape[1]
        self.spatial_dims = train_images.ndim - 2
        self.seed = settings.seed
        self.order_rng = np.random.default_rng(settings.seed)
        self.single_left = False
        self.pin_memory = False
        self.augment_gen = None

    def prepare(self, model: torch.nn.Module, device: torch.device) -> None:
        """Decide what depends on the model and the device, before the first epoch.

        A last batch of one case that the model cannot train on (a batch norm would see
        one value per channel: 3D inputs whose deepest maps are one voxel) is dropped;
        that case falls into a full batch in the other epochs' shuffles."""
        n = len(self.train_images)
        self.single_left = (
            not _batch_of_one_trains(model, self.train_images.shape[1:])
            and n % self.batch_size == 1
            and n > 1
        )
        self.pin_memory = device.type == "cuda"
        self.augment_gen = torch.Generator(device=device).manual_seed(self.seed)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_images) / self.batch_size) - int(self.single_left)

    def epoch_batches(self) -> BatchIterator:
        n = len(self.train_images)
        return BatchIterator(
            self.train_images,
            self.train_targets,
            self.order_rng.permutation(n)[: n - int(self.single_left)],
            self.batch_size,
            pin_memory=self.pin_memory,
        )

    def augment(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(x, self.augment_settings, self.augment_gen), y

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        return self.val_images, self.val_targets


def train_model(
    task,
    train_images: np.ndarray,
    train_targets: np.ndarray,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    settings: TrainSettings,
    **options,
) -> pd.DataFrame:
    """`fit` on cases held as arrays (`ArrayData`): (N, C, *spatial) images, (N,) targets."""
    data = ArrayData(train_images, train_targets, val_images, val_targets, settings)
    return fit(task, data, settings, **options)


def fit(
    task,
    data,
    settings: TrainSettings,
    *,
    threads: int = 1,
    checkpoint_path: str | os.PathLike,
    progress: Callable | None = None,
    recorder=None,
) -> pd.DataFrame:
    """Train `task`'s model; keep the checkpoint with the best validation `task.monitor`.

    `data` supplies the batches (`ArrayData`, or a task's own, e.g. segmentation's
    patches): attributes `in_channels`, `spatial_dims`; `prepare(model, device)` once;
    `steps_per_epoch()`; `epoch_batches()`, an iterable of CPU (x, y) batches for one
    epoch; `augment(x, y)` on the device; `validation()`, the (images, targets) arrays
    scored after each epoch.
    Writes `checkpoint_path` (atomically) holding the best weights, the settings and the
    epoch; returns the per-epoch history. `progress` wraps the epoch range (e.g. tqdm).
    `recorder`: a `radflow.gradients.GradientRecorder` that watches the gradients and
    the loss of every step (the residual ablation); it only reads, so the weights come
    out the same with or without it.
    """
    # ---- switches: device, precision, memory format
    device = resolve_device(settings.device)
    seed_everything(settings.seed, threads)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    autocast_dtype = None
    if on_cuda and settings.mixed_precision:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    channels_last = on_cuda and settings.channels_last  # channels_last(_3d) on CUDA

    model = task.build_model(
        settings.model, in_channels=data.in_channels, spatial_dims=data.spatial_dims
    )
    data.prepare(model, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(data.spatial_dims))
    step_model = torch.compile(model) if settings.compile else model
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # norms and biases
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        fused=on_cuda,
    )
    steps_per_epoch = data.steps_per_epoch()
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = max(1, round(settings.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, warmup_steps, total_steps)
    )
    if recorder is not None:
        recorder.start(model, total_steps)
    val_images, val_targets = data.validation()

    history = []
    step = 0
    best = -math.inf
    epochs = range(1, settings.epochs + 1)
    for epoch in progress(epochs) if progress else epochs:
        # ---- train one epoch
        model.train()
        t_epoch = time.perf_counter()
        data_wait, loss_sum, seen = 0.0, 0.0, 0
        loader = data.epoch_batches()
        t_data = time.perf_counter()
        for x, y in loader:
            x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
            data_wait += time.perf_counter() - t_data
            x, y = data.augment(x, y)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                loss = task.loss(step_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recorder is not None:
                recorder.after_backward(step, scaler)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_value = loss.item()
            loss_sum += loss_value * len(y)
            seen += len(y)
            if recorder is not None:
                recorder.after_step(step, epoch, loss_value)
            step += 1
            t_data = time.perf_counter()
        train_time = time.perf_counter() - t_epoch

        # ---- validate
        val_logits = predict_logits(
            model, val_images, device, settings.eval_batch_size, channels_last, autocast_dtype
        )
        val_out = task.outputs(val_logits).numpy()
        val_loss = float(task.loss(val_logits, torch.as_tensor(val_targets)))
        monitor = task.monitor_value(np.asarray(val_targets), val_out)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "val_loss": val_loss,
            task.monitor: monitor,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t_epoch,
            "images_per_s": seen / max(train_time, 1e-9),
            "data_wait_fraction": data_wait / max(train_time, 1e-9),
        }
        history.append(row)
        score = monitor if not math.isnan(monitor) else -val_loss
        if score > best:
            best = score
            _save_checkpoint(checkpoint_path, model, settings, task, epoch, row)
    return pd.DataFrame(history)


def _save_checkpoint(path, model, settings: TrainSettings, task, epoch: int, row: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "task": task.name,
                "settings": asdict(settings),
                "epoch": epoch,
                "metrics": row,
            },
            tmp,
        )


# ------------------------------------------------------------------ stage entry
def run_fold(
    preprocessed_dirs,
    folds_table,
    fold: int,
    *,
    task_name: str,
    task_modules=(),
    task_options=None,
    settings: TrainSettings,
    threads: int,
    model_path,
    history_path,
    recorder=None,
) -> pd.DataFrame:
    """The train stage for one fold: fit on the other dev folds, select on this one.

    `task_name` and `task_modules` name the study's task (config `task`, `task_modules`;
    see `radflow.tasks.get_task`), `task_options` its settings (`task_options`). `recorder`: as for `train_model` (the ablation's).

    Inputs: the preprocess shard folders and the split table. Outputs: the best
    checkpoint at `model_path` and the per-epoch history table at `history_path`, both
    written atomically, the checkpoint only when training has finished.
    """
    from radflow import conventions as C
    from radflow.runlog import progress
    from radflow.split import fold_members
    from radflow.tasks import get_task

    task = get_task(task_name, modules=task_modules, train=settings, options=task_options)
    store = task.open_store(preprocessed_dirs)
    folds = read_tsv(folds_table)
    available = folds[folds[C.SERIES_PID].map(store.__contains__)]
    if len(available) < len(folds):
        print(
            f"{len(folds) - len(available)} split cases have no preprocessed image "
            "(conversion failed or excluded); they are left out"
        )
    train_rows, val_rows, _ = fold_members(available, fold)
    if train_rows.empty or val_rows.empty:
        raise ValueError(
            f"fold {fold} has {len(train_rows)} training and {len(val_rows)} "
            "validation cases; check split.n_folds against the cohort size"
        )
    data = task.training_data(store, train_rows, val_rows, settings)
    device = resolve_device(settings.device)

    def count(rows, part: str) -> str:  # cases, and positives where there are labels
        labelled = (rows[C.LABEL] >= 0).any()
        positive = f" ({(rows[C.LABEL] == 1).sum()} positive)" if labelled else ""
        return f"{len(rows)} {part} cases{positive}"

    print(
        f"fold {fold}: {count(train_rows, 'training')}, {count(val_rows, 'validation')}; "
        f"device {device}, {threads} threads; "
        f"model {task.name} depth {settings.model.depth} "
        f"width {settings.model.base_width}" + ("" if settings.model.residual else " (plain)")
    )
    # The best-so-far checkpoint is kept under a hidden staging name and moved to
    # `model_path` only once training has finished: a job killed mid-training leaves no
    # model.pt that looks like a finished fold (the rerun starts the fold afresh).
    staging_path = Path(model_path).with_name(f".{Path(model_path).name}.in-progress")
    history = fit(
        task,
        data,
        settings,
        threads=threads,
        checkpoint_path=staging_path,
        progress=lambda epochs: progress(epochs, desc=f"train fold {fold}", unit="epoch"),
        recorder=recorder,
    )
    history.insert(0, C.FOLD, fold)
    with atomic_path(history_path) as tmp:
        history.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    os.replace(staging_path, model_path)
    best = (
        history.loc[history[task.monitor].idxmax()]
        if history[task.monitor].notna().any()
        else history.iloc[-1]
    )
    print(
        f"fold {fold}: best epoch {int(best['epoch'])} {task.monitor} {best[task.monitor]:.4f}; "
        f"mean {history['images_per_s'].mean():.1f} images/s, "
        f"data wait {100 * history['data_wait_fraction'].mean():.1f}% of step time"
    )
    return history
