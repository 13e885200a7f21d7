"""What training does inside the network: gradient norms by layer, loss by step.

`GradientRecorder` is handed to `radflow.train.train_model` (argument `recorder`) by
the residual ablation (radflow.ablation). It records

* the L2 norm of the gradient of the weight of every parameterised layer (convolutions
  and linear layers), in input-to-output order, at three moments: at initialisation
  (the gradient of the first batch, before any update: snapshot "init"), after the first
  `early_steps` updates (the gradient of step `early_steps`, 0-based: "early") and at
  the end (the gradient of the last training step: "end");
* the training loss of every step (the batch mean, as the optimiser saw it).

Together they are the vanishing-gradient picture of He et al. (2016): in a deep plain
network the gradient shrinks (or explodes) from the output towards the input layers;
the identity path of a residual network carries it through.

The recorder only reads: it computes norms of gradients that exist anyway and keeps a
float per step, so it changes neither the random number streams nor the arithmetic of
training (tests/test_train.py checks that the weights come out identical). With loss
scaling (fp16 on CUDA) the gradients are divided by the scale before their norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

__all__ = ["GradientRecorder", "Layer", "weighted_layers"]

SNAPSHOTS = ("init", "early", "end")
#: Columns of the gradient table (one row per snapshot and layer).
GRADIENT_COLUMNS = ("snapshot", "step", "index", "layer", "kind", "path", "grad_norm")
#: Columns of the step table (one row per training step).
STEP_COLUMNS = ("step", "epoch", "train_loss")

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Layer:
    """One parameterised layer. `index`: its position along the main path (1 = the
    first layer after the input); a projection shortcut (a module under a
    `downsample`) is on path "projection" and shares the index of the last main-path
    layer of its block (they both feed the block's sum)."""

    index: int
    name: str
    kind: str  # "conv" or "linear"
    path: str  # "main" or "projection"
    module: nn.Module


def weighted_layers(model: nn.Module) -> list[Layer]:
    """Convolutions and linear layers of `model` in input-to-output order (the order
    they are registered in, which for radflow's networks is the order of the forward
    pass; a projection follows the convolutions of its block)."""
    layers, index = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, _WEIGHTED) or module.weight is None:
            continue
        projection = ".downsample." in f".{name}."
        if not projection:
            index += 1
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        layers.append(Layer(index, name, kind, "projection" if projection else "main", module))
    return layers


class GradientRecorder:
    """Gradient norms per layer at initialisation, after `early_steps` steps and at the
    end; the training loss of every step. See the module docstring.

    `train_model` calls `start` once the model is built, `after_backward` after each
    backward pass (before the optimiser step) and `after_step` after each step.
    """

    def __init__(self, early_steps: int):
        if early_steps < 1:
            raise ValueError(f"ablation.early_steps must be at least 1, got {early_steps}")
        self.early_steps = early_steps
        self._layers: list[Layer] = []
        self._snapshot_at: dict[int, list[str]] = {}
        self._gradients: list[dict] = []
        self._steps: list[dict] = []

    def start(self, model: nn.Module, total_steps: int) -> None:
        """Before training: the layers to watch and the steps to snapshot."""
        self._layers = weighted_layers(model)
        self._snapshot_at = {}
        # a run shorter than early_steps + 1 steps still gets its "end" snapshot
        for name, step in zip(SNAPSHOTS, (0, self.early_steps, total_steps - 1), strict=True):
            if 0 <= step < total_steps:
                self._snapshot_at.setdefault(step, []).append(name)
        self._gradients, self._steps = [], []

    @torch.no_grad()
    def after_backward(self, step: int, scaler=None) -> None:
        """After the backward pass of `step` (0-based, counted over the whole run): the
        gradient norms, where `step` is a snapshot. `scaler`: the training's
        `torch.amp.GradScaler`, whose scale the gradients carry where it is enabled
        (read only at snapshots: reading it waits for the GPU)."""
        names = self._snapshot_at.get(step)
        if not names:
            return
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        norms = torch.stack(
            [
                torch.linalg.vector_norm(layer.module.weight.grad.detach().float())
                if layer.module.weight.grad is not None
                else torch.zeros((), device=layer.module.weight.device)
                for layer in self._layers
            ]
        ).cpu() / float(scale)
        for name in names:
            for layer, norm in zip(self._layers, norms.tolist(), strict=True):
                self._gradients.append(
                    {
                        "snapshot": name,
                        "step": step,
                        "index": layer.index,
                        "layer": layer.name,
                        "kind": layer.kind,
                        "path": layer.path,
                        "grad_norm": norm,
                    }
                )

    def after_step(self, step: int, epoch: int, loss: float) -> None:
        """After the optimiser step `step` of `epoch` (1-based): its batch loss."""
        self._steps.append({"step": step, "epoch": epoch, "train_loss": loss})

    def gradient_table(self) -> pd.DataFrame:
        """One row per snapshot and layer: GRADIENT_COLUMNS."""
        return pd.DataFrame(self._gradients, columns=list(GRADIENT_COLUMNS))

    def step_table(self) -> pd.DataFrame:
        """One row per training step: STEP_COLUMNS."""
        return pd.DataFrame(self._steps, columns=list(STEP_COLUMNS))
