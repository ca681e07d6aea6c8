"""The Frozen-in-Time `SpaceTimeTransformer`, the video encoder of MILES.

Parameter names follow the released model (`patch_embed.proj`, `cls_token`, `pos_embed` with the CLS slot
first, `temporal_embed`, `blocks.i.{norm1,attn,timeattn,norm3,norm2,mlp}`, `norm`) so that released
checkpoints load with a small key map, and a timm ViT's weights load into the spatial part directly.
`temporal_attention=False` is MCQ's VideoFormer: the same blocks without temporal attention (no
`timeattn`, `norm3` or `temporal_embed`), so that released MCQ checkpoints load too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from miles.attention import DividedAttention
from miles_kernels import ops


class SpaceTimeBlock(nn.Module):
    """Temporal attention, then spatial attention, then MLP, in the released residual form.

    The spatial branch is added to the block input `x`, not to the temporal residual: the temporal output
    only feeds the spatial attention's input. This is how the released model computes, so we keep it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        time_init: str = "zeros",
        attention: str = "auto",
        temporal: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, num_heads, backend=attention)
        self.timeattn = DividedAttention(dim, num_heads, backend=attention) if temporal else None
        if temporal and time_init == "zeros":
            self.timeattn.zero_init()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6) if temporal else None

    def forward(self, x: torch.Tensor, frames: int, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        time_residual = x
        if self.timeattn is not None:
            time_residual = x + self.timeattn(self.norm3(x), frames, "time", frame_mask)
        space_residual = x + self.drop_path(self.attn(self.norm1(time_residual), frames, "space", frame_mask))
        return space_residual + self.drop_path(self.mlp(self.norm2(space_residual)))


@dataclass
class VideoFeatures:
    cls: torch.Tensor  # [B, D], after the final norm: the clip embedding
    patches: torch.Tensor  # [B, F, K, D], after the final norm: the predictor's input
    last_hidden: torch.Tensor  # [B, F, K, D], last block output before the final norm: MVM targets


class SpaceTimeTransformer(nn.Module):
    """ViT with divided space-time attention over a (possibly masked) grid of patches."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_frames: int = 4,
        drop_path_rate: float = 0.0,
        time_init: str = "zeros",
        attention: str = "auto",
        temporal_attention: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_frames = num_frames
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        self.patches_per_frame = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patches_per_frame + 1, embed_dim))
        if temporal_attention:
            self.temporal_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        else:  # MCQ's VideoFormer: frames told apart by nothing but their content; not a weight
            self.register_buffer("temporal_embed", torch.zeros(1, num_frames, embed_dim), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # MVM `bert` mode
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(
                embed_dim, num_heads, mlp_ratio, dpr[i], "random", attention, temporal=temporal_attention
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False  # model.grad_checkpointing: per-block activation checkpointing
        for tensor in (self.pos_embed, self.cls_token, self.mask_token):
            trunc_normal_(tensor, std=0.02)
        if temporal_attention:
            trunc_normal_(self.temporal_embed, std=0.02)
        self.apply(_init_weights)
        if temporal_attention and time_init == "zeros":  # after the generic init, which would overwrite it
            for blk in self.blocks:
                blk.timeattn.zero_init()

    def embed(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """video [B, F, 3, H, W] -> tokens [B, 1 + F*N, D] with position embeddings.

        `mask` [B, N] (True = hidden, the same positions in every frame), or [B, F, N] (a mask per frame),
        replaces those patch embeddings by the learned mask token before the position embeddings are added
        (BEiT / MILES `bert` mode).
        """
        b, f = video.shape[:2]
        if f > self.num_frames:
            raise ValueError(f"{f} frames exceed the model's {self.num_frames} temporal embeddings")
        x = self.patch_embed(video.flatten(0, 1)).reshape(b, f, self.patches_per_frame, self.embed_dim)
        if mask is not None:
            if mask.ndim == 3 and mask.shape[1] != f:
                raise ValueError(f"a per-frame mask of {mask.shape[1]} frames for a clip of {f}")
            hidden = mask[:, None, :, None] if mask.ndim == 2 else mask[..., None]
            x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, None, 1:] + self.temporal_embed[:, :f, None]
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(b, -1, -1), x.flatten(1, 2)], dim=1)

    def embed_visible(self, video: torch.Tensor, visible: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """video [B, F, 3, H, W] -> tokens [B, 1 + F*K, D] of the visible tubes only (`drop` mode).

        `ops.drop_tokens` gathers the `visible` [B, K] positions of every frame and adds the spatial
        and temporal embeddings in one pass; hidden tubes never enter the encoder.
        """
        b, f = video.shape[:2]
        if f > self.num_frames:
            raise ValueError(f"{f} frames exceed the model's {self.num_frames} temporal embeddings")
        x = self.patch_embed(video.flatten(0, 1)).reshape(b, f, self.patches_per_frame, self.embed_dim)
        x = ops.drop_tokens(x, visible, self.pos_embed[0, 1:], self.temporal_embed[0], impl=impl)
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(b, -1, -1).to(x.dtype), x.flatten(1, 2)], dim=1)

    def forward_visible(
        self,
        video: torch.Tensor,
        visible: torch.Tensor,
        impl: str = "auto",
        frame_mask: torch.Tensor | None = None,
    ) -> VideoFeatures:
        """Divided attention over the K visible positions per frame and F frames per position."""
        return self.forward_tokens(self.embed_visible(video, visible, impl), video.shape[1], frame_mask)

    def forward_tokens(
        self, x: torch.Tensor, frames: int, frame_mask: torch.Tensor | None = None
    ) -> VideoFeatures:
        """The blocks and final norm; `frame_mask [B, F]` (True = real frame) hides padded frames as keys.

        Features of padded frames are computed (finite) but meaningless: callers ignore them.
        """
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # recomputed in backward instead of kept: activation memory of one block, not `depth`
                x = checkpoint(blk, x, frames, frame_mask, use_reentrant=False)
            else:
                x = blk(x, frames, frame_mask)
        normed = self.norm(x)
        b = x.shape[0]
        return VideoFeatures(
            cls=normed[:, 0],
            patches=normed[:, 1:].reshape(b, frames, -1, self.embed_dim),
            last_hidden=x[:, 1:].reshape(b, frames, -1, self.embed_dim),
        )

    def forward_features(
        self,
        video: torch.Tensor,
        mask: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> VideoFeatures:
        return self.forward_tokens(self.embed(video, mask), video.shape[1], frame_mask)

    def forward(self, video: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The clip embedding (normed CLS), as the released model's `forward`.

        `frame_mask [B, F]` (True = real frame) lets clips with fewer real frames share a padded batch.
        """
        return self.forward_features(video, frame_mask=frame_mask).cls


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
