"""Networks, and the settings a task builds them from (config `model:`).

Importing this package does not import PyTorch (the workflow reads settings while it
plans); the networks live in its modules (`radflow.models.resnet`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from radflow.config import check_keys, schema_defaults

_DEFAULTS = schema_defaults("model")  # config/schema.yaml is the one place defaults live


@dataclass(frozen=True)
class ModelSettings:
    """Config `model:`; every default is the schema's (config/schema.yaml)."""

    depth: int = _DEFAULTS["depth"]  # residual network depth: 10, 18, 34, 50, 101, 152
    residual: bool = _DEFAULTS["residual"]  # False: the plain variant (ablation's control)
    base_width: int = _DEFAULTS["base_width"]  # channels of the first stage
    pooling: str = _DEFAULTS["pooling"]  # global pooling before the head: avg, max, avgmax
    dropout: float = _DEFAULTS["dropout"]  # before the head

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any] | None) -> ModelSettings:
        """From config `model:` (or a checkpoint's stored copy of it); missing keys take
        the schema's defaults, so checkpoints written before a key existed still load.
        Unknown keys are an error naming them."""
        cfg = dict(model_cfg or {})
        check_keys(cls, cfg, "model")
        return cls(**cfg)
