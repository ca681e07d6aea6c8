"""Token-level operations of MILES pre-training, each behind one dispatch point.

`impl="auto"` picks the fastest implementation available for the inputs; `impl="reference"` forces the
plain PyTorch reference that every fast path is tested against; `impl="triton"` forces the Triton kernels
(`kernels/tokens_triton.py`, `kernels/tube_mask_triton.py`, `kernels/masked_feature_loss_triton.py`).

`auto` uses Triton when every tensor is on CUDA and triton imports, the reference otherwise (a CPU run
never pays for the interpreter by accident). `impl="triton"` on CPU tensors runs the Triton interpreter and
needs TRITON_INTERPRET=1 set before `miles_kernels.tokens_triton` is first imported (triton decides at
decoration time whether a kernel is interpreted; the module is imported lazily, on the first Triton call).
"""

from __future__ import annotations

import os

import torch

from miles_kernels.masked_feature_loss import MASKED_FEATURE_LOSS_KINDS, masked_feature_loss_reference
from miles_kernels.tokens import drop_tokens_reference, restore_tokens_reference
from miles_kernels.tube_mask import hidden_indices, num_hidden, tube_mask_reference

IMPLS = ("auto", "reference", "triton")
TUBE_MASK_IMPLS = ("auto", "reference", "triton")
# Every MVM mask type, with (blockwise, one mask per frame): the Triton kernel serves all four.
MASK_TYPES: dict[str, tuple[bool, bool]] = {
    "block_tube": (True, False),
    "random_tube": (False, False),
    "block_frame": (True, True),
    "random_frame": (False, True),
}

__all__ = [
    "tube_mask",
    "mvm_mask",
    "MASK_TYPES",
    "drop_tokens",
    "restore_tokens",
    "hidden_indices",
    "num_hidden",
    "masked_feature_loss",
    "MASKED_FEATURE_LOSS_KINDS",
    "IMPLS",
    "TUBE_MASK_IMPLS",
]


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")


_TRITON_ERROR: str | None = None
_TRITON_CHECKED = False


def _triton_import_error() -> str | None:
    """None when triton imports, else the import error (checked once)."""
    global _TRITON_ERROR, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising something else
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
        _TRITON_CHECKED = True
    return _TRITON_ERROR


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _use_triton(impl: str, *devices: torch.device) -> bool:
    """Whether the token ops run the Triton kernels for these inputs (impl already checked)."""
    if impl == "reference":
        return False
    on_cuda = all(d.type == "cuda" for d in devices)
    if impl == "triton":
        error = _triton_import_error()
        if error is not None:
            raise RuntimeError(f'impl="triton" needs the triton package, which failed to import ({error})')
        if not (on_cuda or _interpreting()):
            raise RuntimeError(
                'impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), got '
                f"devices {sorted({str(d) for d in devices})}"
            )
        return True
    return on_cuda and _triton_import_error() is None


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
    blockwise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, N] bool, True = hidden in every frame; visible [B, K] int64 sorted).

    `blockwise=False`: uniformly random positions instead of BEiT-style rectangles (`random_tube`)."""
    _check_impl(impl, TUBE_MASK_IMPLS)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    args = dict(seed=seed, step=step, device=dev, min_area=min_area, blockwise=blockwise)
    if _use_triton(impl, dev):  # auto: CUDA + triton; triton: CUDA or interpreter
        from miles_kernels.tube_mask_triton import tube_mask_triton  # lazily: importing triton is not free

        return tube_mask_triton(batch, grid, ratio, **args)
    return tube_mask_reference(batch, grid, ratio, **args)


def mvm_mask(
    batch: int,
    frames: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    mask_type: str = "block_tube",
    seed: int,
    step: int = 0,
    device: torch.device | str | None = None,
    impl: str = "auto",
    min_area: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of one MVM step for any of `MASK_TYPES`.

    Tube types: (mask [B, N], visible [B, K]), the same positions hidden in every frame. Frame types:
    (mask [B, F, N], visible [B, F, K]), frame f of sample b drawn as sample `b * F + f` of a tube mask.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {sorted(MASK_TYPES)}, got {mask_type!r}")
    blockwise, per_frame = MASK_TYPES[mask_type]
    rows = batch * frames if per_frame else batch
    mask, visible = tube_mask(
        rows,
        grid,
        ratio,
        seed=seed,
        step=step,
        device=device,
        impl=impl,
        min_area=min_area,
        blockwise=blockwise,
    )
    if per_frame:
        return mask.view(batch, frames, -1), visible.view(batch, frames, -1)
    return mask, visible


def drop_tokens(
    x: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, time: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    _check_impl(impl)
    if _use_triton(impl, x.device, visible.device, pos.device, time.device):
        from miles_kernels.tokens_triton import drop_tokens_triton

        return drop_tokens_triton(x, visible, pos, time)
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
    if _use_triton(impl, y.device, visible.device, mask_token.device, pos.device, time.device):
        from miles_kernels.tokens_triton import restore_tokens_triton

        return restore_tokens_triton(y, visible, mask_token, pos, time)
    return restore_tokens_reference(y, visible, mask_token, pos, time)


def masked_feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    *,
    kind: str = "mse",
    normalize_target: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """MVM loss of pred [B, F, N, C] against the detached target [B, F, N, C] at hidden [B, M] positions.

    Scalar fp32 (fp64 for fp64 inputs; mean over B*F*M*C elements, 0 when M = 0); `auto` falls back to the
    reference for inputs the kernel does not take (fp64, C > 8192).
    """
    _check_impl(impl)
    if _use_triton(impl, pred.device, target.device, hidden.device):
        from miles_kernels.masked_feature_loss_triton import masked_feature_loss_triton, unsupported_reason

        if impl == "triton" or unsupported_reason(pred, target) is None:
            return masked_feature_loss_triton(
                pred, target, hidden, kind=kind, normalize_target=normalize_target
            )
    return masked_feature_loss_reference(pred, target, hidden, kind=kind, normalize_target=normalize_target)
