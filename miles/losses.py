"""Training losses: the symmetric contrastive loss and the masked-feature regression loss of MVM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles.distributed import gather_with_local_grad
from miles_kernels.masked_feature_loss import MASKED_FEATURE_LOSS_KINDS, masked_feature_loss_rows

__all__ = ["NormSoftmaxLoss", "masked_feature_loss", "MASKED_FEATURE_LOSS_KINDS"]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class NormSoftmaxLoss(nn.Module):
    """Symmetric InfoNCE over cosine similarities, with negatives from the global (all-rank) batch.

    ``loss = CE(rows: video -> text) + CE(columns: text -> video)``, each averaged over the global batch,
    on ``sim = normalize(v) @ normalize(t).T / temperature``. Both embeddings are all-gathered with
    :func:`miles.distributed.gather_with_local_grad`, so under DDP the parameter gradients equal those of
    one process holding the whole batch.

    Frozen-in-Time's released ``NormSoftmaxLoss`` takes the similarity matrix ``x`` and computes the same
    two terms, ``log_softmax(x / T, dim=1)`` and ``log_softmax(x.t() / T, dim=1)``; with the same inputs
    this module gives the same value, but it normalises and gathers the embeddings itself.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, video_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Scalar loss from local ``[B, D]`` video and text embeddings (row i of each is a pair)."""
        if video_emb.ndim != 2 or video_emb.shape != text_emb.shape:
            raise ValueError(
                f"expected two [B, D] embeddings of one shape, got {tuple(video_emb.shape)} "
                f"and {tuple(text_emb.shape)}"
            )
        # fp32 even under bf16 autocast: cosines / 0.05 would carry about 0.1 of logit noise in bf16.
        with torch.autocast(video_emb.device.type, enabled=False):
            v = gather_with_local_grad(F.normalize(_at_least_fp32(video_emb), dim=-1))
            t = gather_with_local_grad(F.normalize(_at_least_fp32(text_emb), dim=-1))
            logits = v @ t.t() / self.temperature
            target = torch.arange(logits.shape[0], device=logits.device)
            return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def masked_feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "mse",
    normalize_target: bool = True,
) -> torch.Tensor:
    """Regression of predicted features onto snapshot-encoder targets at the masked positions.

    ``pred`` and ``target`` are ``[B, M, C]`` (M masked positions). The target never receives gradient
    (it comes from the snapshot encoder); per-token layer normalisation (no affine, eps 1e-6) removes the
    scale drift of the snapshot's features so the regression stays well conditioned. Mean over all
    elements (0 when there are none). The one definition lives in `miles_kernels.masked_feature_loss`, shared
    with the fused kernel that works on the full grids.
    """
    return masked_feature_loss_rows(pred, target, kind=kind, normalize_target=normalize_target)
