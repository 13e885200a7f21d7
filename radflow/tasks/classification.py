"""Binary image classification: the first task on radflow's stages.

A task supplies what differs between studies: the model, the loss, how logits become
per-case outputs, the validation score that picks the best checkpoint, and the
evaluation of the predictions. The stages (train, predict, evaluate) call these and
stay the same for segmentation and localisation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radflow.metrics import roc_auc
from radflow.models.resnet import build_resnet


class BinaryClassification:
    name = "classification"
    monitor = "val_auroc"  # higher is better; selects the checkpoint kept per fold

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def build_model(self, model_cfg: dict, *, in_channels: int, spatial_dims: int) -> nn.Module:
        return build_resnet(
            int(model_cfg.get("depth", 18)),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=2,
            base_width=int(model_cfg.get("base_width", 64)),
            dropout=float(model_cfg.get("dropout", 0.0)),
            pooling=str(model_cfg.get("pooling", "avg")),
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets.long(), label_smoothing=self.label_smoothing)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-case output: probability of the positive class."""
        return torch.softmax(logits.float(), dim=1)[:, 1]

    def monitor_value(self, targets: np.ndarray, outputs: np.ndarray) -> float:
        if len(np.unique(targets)) < 2:
            return float("nan")
        return roc_auc(targets, outputs)
