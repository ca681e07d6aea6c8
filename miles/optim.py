"""The optimiser's schedule and parameter groups: linear warm-up then cosine decay, the text tower at its
own learning rate, no weight decay on norms, biases and embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from miles.config import Config
from miles.model import MilesModel


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: MilesModel, cfg: Config) -> list[dict[str, Any]]:
    """Text tower at its own (lower) rate; no weight decay on norms, biases and embeddings."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_text = name.startswith("text_model.")
        no_decay = param.ndim <= 1 or name.endswith(
            ("cls_token", "pos_embed", "temporal_embed", "mask_token")
        )
        groups.setdefault((is_text, no_decay), []).append(param)
    out = []
    for (is_text, no_decay), params in sorted(groups.items()):
        lr = cfg.train.text_lr if is_text else cfg.train.lr
        out.append(
            {
                "params": params,
                "lr": lr,
                "base_lr": lr,
                "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
            }
        )
    return out
