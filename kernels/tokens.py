"""Masked-token dropping and restoring: the plain PyTorch references.

`drop_tokens` keeps the visible tube positions of every frame and adds the spatial and temporal position
embeddings; `restore_tokens` puts encoder outputs back on the full grid with a mask token elsewhere.
Both are differentiable through autograd (gather / scatter), which is what a fused kernel must match.
"""

from __future__ import annotations

import torch


def _check(x: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, time: torch.Tensor, n: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected tokens [B, F, N|K, C], got shape {tuple(x.shape)}")
    b, f, _, c = x.shape
    if visible.dim() != 2 or visible.shape[0] != b:
        raise ValueError(f"visible must be [B={b}, K], got {tuple(visible.shape)}")
    if pos.shape != (n, c):
        raise ValueError(f"pos must be [N={n}, C={c}], got {tuple(pos.shape)}")
    if time.dim() != 2 or time.shape[1] != c or time.shape[0] < f:
        raise ValueError(f"time must be [>= F={f}, C={c}], got {tuple(time.shape)}")


def drop_tokens_reference(
    x: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, time: torch.Tensor
) -> torch.Tensor:
    """x [B, F, N, C] -> x[:, :, visible] + pos[visible] + time[:F]  ([B, F, K, C])."""
    _check(x, visible, pos, time, x.shape[2])
    b, f, _, c = x.shape
    k = visible.shape[1]
    idx = visible[:, None, :, None].expand(b, f, k, c)
    kept = torch.gather(x, 2, idx)
    return kept + pos[visible][:, None] + time[:f][None, :, None, :]


def restore_tokens_reference(
    y: torch.Tensor, visible: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, time: torch.Tensor
) -> torch.Tensor:
    """y [B, F, K, C] -> grid [B, F, N, C]: y at visible positions, mask_token elsewhere, + pos + time."""
    n = pos.shape[0]
    _check(y, visible, pos, time, n)
    b, f, k, c = y.shape
    grid = mask_token.to(y.dtype).expand(b, f, n, c)
    idx = visible[:, None, :, None].expand(b, f, k, c)
    grid = grid.scatter(2, idx, y)
    return grid + pos[None, None] + time[:f][None, :, None, :]
