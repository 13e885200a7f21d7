"""Training loop, checkpointing, prediction and Grad-CAM on a tiny learnable problem."""

import dataclasses

import numpy as np
import pytest
import torch

from radflow.augment import AugmentSettings
from radflow.gradcam import cam_hits_lesion, ensemble_cam
from radflow.inference import load_model, predict_logits
from radflow.models import ModelSettings
from radflow.tasks import get_task
from radflow.train import TrainSettings, train_model

SIZE = 32


def _blobs(n, seed):
    """Noise images; positives carry one bright disc (radius 3 px) at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.4, 0.08, (n, 1, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(n) % 2
    centres = []
    rr, cc = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        r, c = rng.integers(6, SIZE - 6, 2)
        centres.append((r, c))
        if labels[i]:
            images[i, 0][np.hypot(rr - r, cc - c) <= 3] += 0.5
    return images.astype(np.float16), labels, centres


SETTINGS = TrainSettings(
    epochs=14,
    batch_size=16,
    learning_rate=3e-3,
    seed=0,
    warmup_epochs=0.5,
    augment=AugmentSettings(rotation_deg=5, noise_std=0.01),
    model=ModelSettings(depth=18, base_width=8),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    task = get_task("classification")
    x, y, _ = _blobs(96, 0)
    vx, vy, vc = _blobs(48, 1)
    path = tmp_path_factory.mktemp("train") / "model.pt"
    history = train_model(task, x, y, vx, vy, SETTINGS, threads=2, checkpoint_path=path)
    return task, history, path, (vx, vy, vc)


def test_training_learns_a_visible_signal(trained):
    _, history, _, _ = trained
    assert history["val_auroc"].max() > 0.95
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert set(history.columns) >= {
        "epoch",
        "train_loss",
        "val_loss",
        "val_auroc",
        "lr",
        "images_per_s",
        "data_wait_fraction",
    }
    # warm-up then cosine decay: the last epoch's rate is far below the peak
    assert history["lr"].iloc[-1] < 0.2 * history["lr"].max()


def test_checkpoint_holds_the_best_epoch_and_reproduces_its_score(trained):
    task, history, path, (vx, vy, _) = trained
    model, checkpoint = load_model(
        path, task, in_channels=1, spatial_dims=2, device=torch.device("cpu")
    )
    best = history.loc[history["val_auroc"].idxmax()]
    assert checkpoint["epoch"] == int(best["epoch"])
    probs = task.outputs(predict_logits(model, vx, torch.device("cpu"), 64)).numpy()
    assert task.monitor_value(vy, probs) == pytest.approx(best["val_auroc"])


def test_cpu_training_is_repeatable(tmp_path):
    task = get_task("classification")
    x, y, _ = _blobs(32, 2)
    settings = dataclasses.replace(SETTINGS, epochs=2)
    states = []
    for run, seed in enumerate([5, 5, 6]):
        path = tmp_path / f"m{run}.pt"
        train_model(
            task,
            x,
            y,
            x,
            y,
            dataclasses.replace(settings, seed=seed),
            threads=1,
            checkpoint_path=path,
        )
        states.append(torch.load(path, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_grad_cam_points_at_the_signal(trained):
    task, _, path, (vx, vy, centres) = trained
    model, _ = load_model(path, task, in_channels=1, spatial_dims=2, device=torch.device("cpu"))
    positives = np.flatnonzero(vy == 1)
    cams = ensemble_cam([model], vx[positives], "layer1")
    assert cams.shape == (len(positives), SIZE, SIZE)
    assert cams.min() >= 0 and cams.max() <= 1
    hits = [
        cam_hits_lesion(cam, [(*centres[i], 3.0)], margin_px=3)
        for cam, i in zip(cams, positives, strict=True)
    ]
    # a hit disc of radius 6 px covers pi*36/1024 = 11% of the image: a map unrelated to
    # the blob hits about one case in nine, not half of them
    chance = np.pi * 6**2 / SIZE**2
    assert np.mean(hits) >= max(0.5, 4 * chance)


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    x, y, _ = _blobs(8, 3)
    with pytest.raises(RuntimeError, match="train.device"):
        train_model(
            get_task("classification"),
            x,
            y,
            x,
            y,
            dataclasses.replace(SETTINGS, device="cuda", epochs=1),
            checkpoint_path=tmp_path / "m.pt",
        )


def _balls(n, seed, size=16):
    """3D noise volumes (n, 1, size, size, size); positives carry one bright ball."""
    rng = np.random.default_rng(seed)
    volumes = rng.normal(0.4, 0.08, (n, 1, size, size, size)).astype(np.float32)
    labels = np.arange(n) % 2
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for i in np.flatnonzero(labels):
        z, y, x = rng.integers(4, size - 4, 3)
        volumes[i, 0][np.sqrt((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) <= 2.5] += 0.5
    return volumes.astype(np.float16), labels


def test_a_3d_fold_trains_end_to_end_with_3d_augmentation(tmp_path):
    """A 3D residual network on 3D volumes, with 3D augmentation on the training device:
    it learns the ball, and its checkpoint predicts volumes."""
    task = get_task("classification")
    x, y = _balls(64, 0)
    vx, vy = _balls(32, 1)
    settings = dataclasses.replace(
        SETTINGS, epochs=10, augment=AugmentSettings(rotation_deg=10, noise_std=0.01)
    )
    path = tmp_path / "model.pt"
    history = train_model(task, x, y, vx, vy, settings, threads=2, checkpoint_path=path)
    assert history["val_auroc"].max() > 0.9
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    model, _ = load_model(path, task, in_channels=1, spatial_dims=3, device=torch.device("cpu"))
    logits = predict_logits(model, vx, torch.device("cpu"), 8).numpy()
    assert logits.shape[0] == len(vx) and np.isfinite(logits).all()


def test_a_last_batch_of_one_case_is_dropped_not_fatal(tmp_path):
    """A 3D network whose deepest maps are one voxel cannot train on a batch of one (batch
    norm): 17 volumes at batch 8 must still train (the 17th waits for another epoch)."""
    task = get_task("classification")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (17, 1, 16, 16, 16)).astype(np.float32)
    y = np.arange(17) % 2
    settings = dataclasses.replace(SETTINGS, epochs=1, batch_size=8)
    history = train_model(task, x, y, x, y, settings, threads=1,
                          checkpoint_path=tmp_path / "m.pt")  # fmt: skip
    assert len(history) == 1 and (tmp_path / "m.pt").is_file()


def test_batch_of_one_check_is_a_dry_run():
    from radflow.models import ModelSettings
    from radflow.train import _batch_of_one_trains

    task = get_task("classification")
    flat = task.build_model(ModelSettings(depth=18, base_width=4), in_channels=1, spatial_dims=3)
    state = {k: v.clone() for k, v in flat.state_dict().items()}
    rng = torch.get_rng_state()
    assert not _batch_of_one_trains(flat, (1, 16, 16, 16))  # layer4 maps: 1 voxel
    assert _batch_of_one_trains(flat, (1, 64, 64, 64))  # 2 x 2 x 2: trains
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in flat.state_dict().items())


def test_the_gradient_recorder_changes_nothing_in_training(tmp_path):
    """The ablation's recorder only reads: weights and history come out identical, and
    it sees every step and every weighted layer at its three snapshots."""
    from radflow.gradients import GradientRecorder

    task = get_task("classification")
    x, y, _ = _blobs(40, 4)
    settings = dataclasses.replace(SETTINGS, epochs=2, batch_size=8)
    recorder = GradientRecorder(early_steps=3)
    runs = {}
    for name, rec in (("plain", None), ("recorded", recorder)):
        path = tmp_path / f"{name}.pt"
        history = train_model(task, x, y, x, y, settings, threads=1, checkpoint_path=path,
                              recorder=rec)  # fmt: skip
        runs[name] = (history, torch.load(path, weights_only=True)["state_dict"])
    (h0, s0), (h1, s1) = runs["plain"], runs["recorded"]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    same = ["epoch", "train_loss", "val_loss", "val_auroc", "lr"]
    assert h0[same].equals(h1[same])
    steps = recorder.step_table()
    assert (
        steps["step"].tolist() == list(range(10)) and steps["epoch"].tolist() == [1] * 5 + [2] * 5
    )
    # the per-step losses average to the epoch's training loss (batches of 8, 40 cases)
    assert steps.groupby("epoch")["train_loss"].mean().tolist() == pytest.approx(
        h1["train_loss"].tolist()
    )
    grads = recorder.gradient_table()
    assert grads.groupby("snapshot")["step"].first().to_dict() == {"init": 0, "early": 3, "end": 9}
    assert (grads.groupby("snapshot").size() == 18 + 3).all()  # 18 main layers, 3 projections
    later = grads[grads["snapshot"] != "init"]
    assert (later["grad_norm"] > 0).all()
    # at initialisation a zero-init residual branch passes no gradient to its
    # convolutions (its last BatchNorm scales it by 0); the stem, the projections and the
    # head get theirs through the identity and projection paths
    init = grads[grads["snapshot"] == "init"].set_index("layer")["grad_norm"]
    branches = [n for n in init.index if n.startswith("layer") and "downsample" not in n]
    assert (init[branches] == 0).all() and init.drop(branches).gt(0).all()
