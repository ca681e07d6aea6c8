"""The snapshot video encoder: a slowly moving copy of the video encoder that provides MVM targets.

Because it is the video encoder itself, a little in the past, its patch features already carry the
language alignment the contrastive loss has taught: that is MILES' "injected language semantics",
with no extra tokenizer and no extra pre-training stage.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from miles.config import CHOICES
from miles.video_encoder import SpaceTimeTransformer

SNAPSHOT_MODES = ("ema", "copy", "frozen")
MOMENTUM_SCHEDULES = CHOICES["mvm.ema_schedule"]  # constant, cosine: one list, the config's


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: `base` at step 0, rising along a half cosine to 1.0 at step `total`."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class SnapshotEncoder(nn.Module):
    """EMA (`p <- m p + (1 - m) q`), periodic copy, or (`frozen`, an ablation) the step-0 copy of the
    online encoder; never trained directly."""

    def __init__(
        self,
        online: SpaceTimeTransformer,
        mode: str = "ema",
        momentum: float = 0.999,
        copy_every: int = 1000,
        schedule: str = "constant",
        total_steps: int = 1,
    ):
        super().__init__()
        if mode not in SNAPSHOT_MODES:
            raise ValueError(f"snapshot mode must be one of {SNAPSHOT_MODES}, got {mode!r}")
        if schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
        self.encoder = copy.deepcopy(online).eval()
        self.encoder.requires_grad_(False)
        self.mode = mode
        self.momentum = momentum
        self.copy_every = copy_every
        self.schedule = schedule
        self.total_steps = total_steps

    def momentum_at(self, step: int) -> float:
        """The EMA momentum applied after optimizer step `step` (1-based)."""
        if self.schedule == "cosine":
            return cosine_momentum(self.momentum, step, self.total_steps)  # 1.0 after the last step
        return self.momentum

    def train(self, mode: bool = True) -> SnapshotEncoder:
        """Always in eval mode: targets without dropout or drop-path."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, online: SpaceTimeTransformer, step: int) -> None:
        """Called after optimizer step `step` (1-based)."""
        if self.mode == "frozen":
            return
        src = list(online.parameters())
        dst = list(self.encoder.parameters())
        if self.mode == "copy":
            if step % self.copy_every == 0:
                torch._foreach_copy_(dst, src)
        else:
            torch._foreach_lerp_(dst, src, 1.0 - self.momentum_at(step))
        for b_dst, b_src in zip(self.encoder.buffers(), online.buffers(), strict=True):
            b_dst.copy_(b_src)

    @torch.no_grad()
    def targets(self, video: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Last-block patch features of the unmasked video, [B, F, N, D] (the MVM loss computes in fp32
        whatever dtype they come in).

        `dtype` (`mvm.snapshot_precision`) is the forward's compute dtype whatever autocast the caller
        runs: this no-grad pass over the full grid is about half of a `drop`-mode step's FLOPs, so bf16
        here could pay where the online encoder trains in fp32. None: the caller's autocast decides."""
        if dtype is None:
            return self.encoder.forward_features(video).last_hidden
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"snapshot targets are computed in float32 or bfloat16, not {dtype}")
        bf16 = dtype == torch.bfloat16
        with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.encoder.forward_features(video).last_hidden
