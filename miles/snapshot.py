"""The snapshot video encoder: a slowly moving copy of the video encoder that provides MVM targets.

Because it is the video encoder itself, a little in the past, its patch features already carry the
language alignment the contrastive loss has taught: that is MILES' "injected language semantics",
with no extra tokenizer and no extra pre-training stage.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from miles.video_encoder import SpaceTimeTransformer


class SnapshotEncoder(nn.Module):
    """EMA (`p <- m p + (1 - m) q`) or periodic copy of the online encoder; never trained directly."""

    def __init__(
        self, online: SpaceTimeTransformer, mode: str = "ema", momentum: float = 0.999, copy_every: int = 1000
    ):
        super().__init__()
        if mode not in ("ema", "copy"):
            raise ValueError(f"snapshot mode must be 'ema' or 'copy', got {mode!r}")
        self.encoder = copy.deepcopy(online).eval()
        self.encoder.requires_grad_(False)
        self.mode = mode
        self.momentum = momentum
        self.copy_every = copy_every

    def train(self, mode: bool = True) -> SnapshotEncoder:
        """Always in eval mode: targets without dropout or drop-path."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, online: SpaceTimeTransformer, step: int) -> None:
        """Called after optimizer step `step` (1-based)."""
        src = list(online.parameters())
        dst = list(self.encoder.parameters())
        if self.mode == "copy":
            if step % self.copy_every == 0:
                torch._foreach_copy_(dst, src)
        else:
            torch._foreach_lerp_(dst, src, 1.0 - self.momentum)
        for b_dst, b_src in zip(self.encoder.buffers(), online.buffers(), strict=True):
            b_dst.copy_(b_src)

    @torch.no_grad()
    def targets(self, video: torch.Tensor) -> torch.Tensor:
        """Last-block patch features of the unmasked video, [B, F, N, D]."""
        return self.encoder.forward_features(video).last_hidden
