"""Retrieval and zero-shot classification metrics.

Standard definitions (R@K, median and mean rank, top-k accuracy) so that numbers are comparable with
published video-text retrieval results. Ranks are 1-based and ties are broken optimistically: the rank
of the ground truth is one plus the number of candidates that score *strictly* higher than it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from miles.stop import NonFiniteError

__all__ = ["retrieval_metrics", "zeroshot_accuracy", "chance_levels", "ranks_to_metrics"]

_RECALL_KS = (1, 5, 10)


def _as_float_tensor(sim: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A 2-D floating tensor on its original device; low-precision floats widened to float32.

    Widening never reorders scores, so ranks (ties included) are unchanged; float64 is kept as is
    so that narrowing cannot create ties that the caller's scores do not have.
    """
    t = torch.as_tensor(sim).detach()
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D similarity matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        # NaN scores all tie, and the optimistic tie rule would rank every one of them first.
        raise NonFiniteError(
            f"{bad} of the {t.numel()} similarity scores are NaN or inf: the model's embeddings are not "
            "finite, so no ranking of them means anything; refusing to report metrics"
        )
    return t


def _as_index_tensor(idx: Sequence[int] | torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
    return t.to(device=device, dtype=torch.long).reshape(-1)


def ranks_to_metrics(ranks: torch.Tensor | np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent and median/mean rank from 1-based ranks (one per query).

    Ranks averaged over ties may be fractional; the released evaluation then counts R@1 only for rank
    exactly 1 and R@K (K > 1) for rank below K + 1. For whole ranks both are plain `rank <= K`."""
    r = np.asarray(torch.as_tensor(ranks).detach().cpu().to(torch.float64).numpy()).reshape(-1)
    if r.size == 0:
        raise ValueError("no queries to score")
    out = {f"R{k}": float(100.0 * np.mean(r <= 1 if k == 1 else r < k + 1)) for k in _RECALL_KS}
    # np.median averages the two middle ranks for an even count, as the official evaluation does.
    out["MedR"] = float(np.median(r))
    out["MeanR"] = float(np.mean(r))
    return out


TIE_RULES = ("optimistic", "average")


def retrieval_metrics(
    sim: torch.Tensor | np.ndarray,
    caption_to_video: Sequence[int],
    *,
    t2v_ties: str = "optimistic",
    v2t_ties: str = "optimistic",
) -> dict[str, dict[str, float]]:
    """Text-to-video and video-to-text retrieval metrics from a ``[num_captions, num_videos]`` matrix.

    ``caption_to_video[i]`` is the video of caption ``i``; a video may own several captions.

    * t2v: every caption is a query; its rank is that of its video among all videos.
    * v2t: every video that owns at least one caption is a query; its rank is that of the best-ranked of
      its own captions among all captions (the Frozen-in-Time / VSE convention). Videos without a caption
      still act as distractors for t2v but are not v2t queries.

    Ties: `optimistic` counts only candidates that score strictly higher; `average` takes the mean of
    the positions the tied candidates share (what the released code does for v2t; it is optimistic for
    t2v). They differ only on exactly tied scores.
    """
    for name, rule in (("t2v_ties", t2v_ties), ("v2t_ties", v2t_ties)):
        if rule not in TIE_RULES:
            raise ValueError(f"{name} must be one of {TIE_RULES}, got {rule!r}")
    s = _as_float_tensor(sim)
    num_captions, num_videos = s.shape
    c2v = _as_index_tensor(caption_to_video, s.device)
    if c2v.numel() != num_captions:
        raise ValueError(f"caption_to_video has {c2v.numel()} entries for {num_captions} captions")
    if num_captions == 0 or num_videos == 0:
        raise ValueError("empty similarity matrix")
    if int(c2v.min()) < 0 or int(c2v.max()) >= num_videos:
        raise ValueError(f"caption_to_video holds indices outside [0, {num_videos})")

    caption_idx = torch.arange(num_captions, device=s.device)
    gt = s[caption_idx, c2v]  # [C] score of each caption with its own video
    t2v_ranks = _rank(s, gt[:, None], dim=1, rule=t2v_ties)

    has_caption = torch.zeros(num_videos, dtype=torch.bool, device=s.device)
    has_caption[c2v] = True
    # A video's rank is that of its best-scoring own caption: under either tie rule a higher score never
    # ranks lower, so the best caption's rank is the minimum over the video's captions.
    best = torch.full((num_videos,), float("-inf"), dtype=s.dtype, device=s.device)
    best = best.scatter_reduce(0, c2v, gt, reduce="amax", include_self=True)
    v2t_ranks = _rank(s, best[None, :], dim=0, rule=v2t_ties)[has_caption]

    return {"t2v": ranks_to_metrics(t2v_ranks), "v2t": ranks_to_metrics(v2t_ranks)}


def _rank(scores: torch.Tensor, target: torch.Tensor, dim: int, rule: str) -> torch.Tensor:
    """1-based rank of `target` among `scores` along `dim`: strictly higher ones, plus half of the
    other tied ones when ties are averaged (the mean of the positions they share)."""
    higher = (scores > target).sum(dim=dim)
    if rule == "optimistic":
        return 1 + higher
    tied_others = (scores == target).sum(dim=dim) - 1
    return 1 + higher.to(torch.float64) + tied_others.to(torch.float64) / 2


def zeroshot_accuracy(sim: torch.Tensor | np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent from a ``[num_videos, num_classes]`` video-to-class-text matrix.

    Correct at k when fewer than k classes score strictly higher than the true class (optimistic ties,
    consistent with :func:`retrieval_metrics`); k is capped at the number of classes.
    """
    s = _as_float_tensor(sim)
    num_videos, num_classes = s.shape
    y = _as_index_tensor(labels, s.device)
    if y.numel() != num_videos:
        raise ValueError(f"labels has {y.numel()} entries for {num_videos} videos")
    if num_videos == 0 or num_classes == 0:
        raise ValueError("empty similarity matrix")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels hold indices outside [0, {num_classes})")
    gt = s[torch.arange(num_videos, device=s.device), y]
    higher = (s > gt[:, None]).sum(dim=1)
    return {
        "top1": float(100.0 * (higher < 1).double().mean()),
        "top5": float(100.0 * (higher < min(5, num_classes)).double().mean()),
    }


def chance_levels(num_videos: int, num_captions: int, num_classes: int | None) -> dict[str, float | None]:
    """Expected R@1 and top-1 (percent) of a random scorer, to judge how far above chance a run is.

    R@1 is ``100 / num_videos`` for both directions: for t2v trivially; for v2t a video with ``m`` of the
    ``num_captions`` captions is hit at rank 1 with probability ``m / num_captions``, which averages to
    ``1 / num_videos`` over videos when every video owns at least one caption.
    """
    if num_videos <= 0 or num_captions <= 0:
        raise ValueError("num_videos and num_captions must be positive")
    if num_classes is not None and num_classes <= 0:
        raise ValueError("num_classes must be positive or None")
    return {
        "R1": 100.0 / num_videos,
        "top1": None if num_classes is None else 100.0 / num_classes,
    }
