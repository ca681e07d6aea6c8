"""Token-level operations of MILES pre-training, each behind one dispatch point.

`impl="auto"` picks the fastest implementation available for the inputs; `impl="reference"` forces the
plain PyTorch reference that every fast path is tested against.
"""

from __future__ import annotations

import torch

from kernels.tokens import drop_tokens_reference, restore_tokens_reference
from kernels.tube_mask import hidden_indices, num_hidden, tube_mask_reference

IMPLS = ("auto", "reference")

__all__ = ["tube_mask", "drop_tokens", "restore_tokens", "hidden_indices", "num_hidden", "IMPLS"]


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def tube_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    seed: int,
    step: int = 0,
    device: torch.device | str | None = None,
    impl: str = "auto",
    min_area: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, N] bool, True = hidden in every frame; visible [B, K] int64 sorted)."""
    _check_impl(impl)
    return tube_mask_reference(batch, grid, ratio, seed=seed, step=step, device=device, min_area=min_area)


def drop_tokens(
    x: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, time: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    _check_impl(impl)
    return drop_tokens_reference(x, visible, pos, time)


def restore_tokens(
    y: torch.Tensor,
    visible: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor,
    time: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    _check_impl(impl)
    return restore_tokens_reference(y, visible, mask_token, pos, time)
