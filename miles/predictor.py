"""The MVM predictor: encoder features back on the full grid, a few light blocks, features out.

It restores the grid with `ops.restore_tokens` (encoder outputs at visible positions, a learned mask
token elsewhere, plus its own position embeddings), so the same module serves `bert` mode (every position
visible, nothing to restore) and the token-dropping mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from miles.video_encoder import SpaceTimeBlock, VideoFeatures, _init_weights
from miles_kernels import ops


class MaskedFeaturePredictor(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        num_patches: int,
        num_frames: int,
        target_dim: int,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, dim))
        self.temporal_embed = nn.Parameter(torch.zeros(num_frames, dim))
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(dim, num_heads, time_init="random", attention=attention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, target_dim)
        for tensor in (self.mask_token, self.pos_embed, self.temporal_embed):
            trunc_normal_(tensor, std=0.02)
        self.apply(_init_weights)

    def forward(
        self,
        features: VideoFeatures,
        visible: torch.Tensor,
        impl: str = "auto",
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features.patches [B, F, K, D] at `visible` [B, K] -> predictions [B, F, N, target_dim].

        `frame_mask [B, F]` (True = real frame) hides padded frames from the temporal and CLS attention.
        """
        y = self.embed(features.patches)
        grid = ops.restore_tokens(y, visible, self.mask_token, self.pos_embed, self.temporal_embed, impl=impl)
        b, f = grid.shape[:2]
        x = torch.cat([self.embed(features.cls)[:, None], grid.flatten(1, 2)], dim=1)
        for blk in self.blocks:
            x = blk(x, f, frame_mask)
        return self.head(self.norm(x[:, 1:])).reshape(b, f, grid.shape[2], -1)
