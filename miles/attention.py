"""Divided space-time attention of the Frozen-in-Time / MILES video encoder.

Tokens are `[B, 1 + F*K, D]`: one CLS token, then F frames of K spatial tokens (K = N on the full grid,
K < N when masked tokens are dropped). The CLS query attends to every token; every other query attends
either along time (same position, all frames) or along space (same frame, all positions), with the CLS
key and value prepended to each of those sequences, exactly as in the released model.

Backends: `reference` is the einsum formulation of the released code; `sdpa` hands the same sequences to
`torch.nn.functional.scaled_dot_product_attention` as one batched call per direction.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("sdpa", "reference")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims; any leading batch dims."""
    if backend == "sdpa":
        # Every sequence goes on the batch axis with one head: fused CUDA kernels cap the head axis at
        # 65535, while torch splits an oversized batch axis itself.
        lead = q.shape[:-2]
        out = F.scaled_dot_product_attention(
            q.reshape(-1, 1, *q.shape[-2:]),
            k.reshape(-1, 1, *k.shape[-2:]),
            v.reshape(-1, 1, *v.shape[-2:]),
            dropout_p=dropout_p,
        )
        return out.reshape(*lead, *out.shape[-2:])
    if backend == "reference":
        scale = q.shape[-1] ** -0.5
        sim = torch.einsum("...id,...jd->...ij", q * scale, k)
        weights = sim.softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.einsum("...ij,...jd->...id", weights, v)
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


class DividedAttention(nn.Module):
    """Multi-head attention along time or space, CLS over everything (the released `VarAttention`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def zero_init(self) -> None:
        """The released `time_init='zeros'`: qkv = 0 so the branch outputs 0 until it learns."""
        nn.init.zeros_(self.qkv.weight)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.ones_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, frames: int, along: str) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        k_pos = (t - 1) // frames
        if k_pos * frames != t - 1:
            raise ValueError(f"{t - 1} patch tokens do not split into {frames} frames")
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3, B, H, T, dh
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        cls_out = attend(q[:, :, :1], k, v, self.backend, drop)  # [B, H, 1, dh]

        def grid(z: torch.Tensor) -> torch.Tensor:  # [B, H, F, K, dh]
            z = z[:, :, 1:].reshape(b, h, frames, k_pos, -1)
            return z.transpose(2, 3) if along == "time" else z

        qg, kg, vg = grid(q), grid(k), grid(v)  # time: [B,H,K,F,dh]; space: [B,H,F,K,dh]
        groups = qg.shape[2]
        cls_k = k[:, :, None, :1].expand(b, h, groups, 1, k.shape[-1])
        cls_v = v[:, :, None, :1].expand(b, h, groups, 1, v.shape[-1])
        out = attend(qg, torch.cat([cls_k, kg], dim=3), torch.cat([cls_v, vg], dim=3), self.backend, drop)
        if along == "time":
            out = out.transpose(2, 3)
        out = torch.cat([cls_out, out.reshape(b, h, frames * k_pos, -1)], dim=2)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out))
