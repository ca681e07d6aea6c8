"""The masked-feature (MVM) regression loss: the plain PyTorch reference and its one loss definition.

MVM regresses the predictor's features onto the snapshot encoder's features at the hidden tube
positions. The target never receives gradient (it comes from the no-grad snapshot encoder); per-token
layer normalisation (no affine, eps 1e-6) removes the snapshot's scale drift so the regression stays well
conditioned. The loss is the mean over every element, computed in (at least) fp32 whatever the input
dtype or autocast state. An empty selection (no hidden position) gives 0, not the NaN of an empty mean.

`masked_feature_loss_rows` is that definition on already-selected rows (`miles.losses` uses it);
`masked_feature_loss_reference` selects the hidden rows of full [B, F, N, C] grids first, which is what the
fused Triton kernel (`kernels/masked_feature_loss_triton.py`) does without materialising the selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_FEATURE_LOSS_KINDS = ("mse", "smooth_l1")
LAYER_NORM_EPS = 1e-6


def check_kind(kind: str) -> None:
    if kind not in MASKED_FEATURE_LOSS_KINDS:
        allowed = ", ".join(MASKED_FEATURE_LOSS_KINDS)
        raise ValueError(f"unknown masked feature loss kind {kind!r}; allowed: {allowed}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def masked_feature_loss_rows(
    pred: torch.Tensor, target: torch.Tensor, *, kind: str = "mse", normalize_target: bool = True
) -> torch.Tensor:
    """Mean loss of `pred` against the (detached, optionally layer-normalised) `target`, same shape [..., C].

    Math in fp32 (fp64 inputs stay fp64), also under autocast. Mean = sum / numel, so no rows give 0.
    """
    check_kind(kind)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = _at_least_fp32(pred), _at_least_fp32(target.detach())
        if normalize_target:
            target = F.layer_norm(target, target.shape[-1:], eps=LAYER_NORM_EPS)
        if kind == "mse":
            total = F.mse_loss(pred, target, reduction="sum")
        else:
            total = F.smooth_l1_loss(pred, target, reduction="sum", beta=1.0)
        return total / max(pred.numel(), 1)


def _check_grid(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> None:
    if pred.dim() != 4:
        raise ValueError(f"pred must be a [B, F, N, C] grid, got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} must have pred's shape {tuple(pred.shape)}")
    if hidden.dim() != 2 or hidden.shape[0] != pred.shape[0]:
        raise ValueError(f"hidden must be [B={pred.shape[0]}, M] positions, got {tuple(hidden.shape)}")
    if hidden.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"hidden must be an integer index tensor (ops.hidden_indices), got {hidden.dtype}")


def gather_hidden(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """x [B, F, N, C] at positions hidden [B, M] of every frame -> [B, F, M, C] (a copy)."""
    b, f, _, c = x.shape
    idx = hidden.long()[:, None, :, None].expand(b, f, hidden.shape[1], c)
    return torch.gather(x, 2, idx)


def masked_feature_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    *,
    kind: str = "mse",
    normalize_target: bool = True,
) -> torch.Tensor:
    """Scalar loss (fp32; fp64 for fp64 inputs) of pred vs target ([B, F, N, C]) at hidden [B, M]."""
    check_kind(kind)
    _check_grid(pred, target, hidden)
    return masked_feature_loss_rows(
        gather_hidden(pred, hidden),
        gather_hidden(target.detach(), hidden),
        kind=kind,
        normalize_target=normalize_target,
    )
