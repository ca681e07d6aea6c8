"""Fused Triton masked-feature (MVM) loss: select, normalise, compare and reduce in one pass per direction.

The reference gathers two [B, F, M, C] copies (prediction and target), layer-normalises the target copy,
takes the loss and lets autograd scatter the gradient back onto the full grid. Here nothing but the
gradient grid itself is materialised:

* `_loss_fwd_kernel`: one program per block of BLOCK_R selected rows (row r = (b*F + f)*M + m). It reads
  hidden[b, m] and loads that pred row and target row straight from the [B, F, N, C] grids, normalises the
  target row in registers (fp32 mean / variance over C, no affine, eps 1e-6), takes the squared or
  smooth-L1 (beta 1) error and writes one fp32 partial sum. The partials are summed by torch (a fixed
  order, so the loss is deterministic) and divided by B*F*M*C.
* `_loss_bwd_kernel`: one program per (b, f, block of BLOCK_R grid rows), covering the whole grid, so the
  gradient is written once with no separate zero fill. A tiny on-device count [B, N] (how often position n
  is listed in hidden[b]; 1 or 0 for ops.hidden_indices, built with a torch scatter_add, no host
  sync) says which rows are selected: those reload pred and target, recompute the normalised target and
  store count * dloss/dpred * grad_output / (B*F*M*C); every other row stores 0. Recomputing costs one
  more read of the selected rows, less than writing the gradient in the forward and rescaling it.

Each program walks its rows' columns in BLOCK_C chunks (256 or 128 wide when that divides C, so every warp
has work at C = 768 or 384): the target's row mean, then its centred variance, then the loss or gradient,
re-reading the rows' chunks from cache. C is a compile-time constant, so Triton knows the rows' alignment
and the column mask's, and moves data in 16-byte vectors wherever the row width allows (fp32 at C = 108
for the HOG target; bf16 rows of 108 are only 8-byte aligned). The target gets no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miles_kernels.masked_feature_loss import LAYER_NORM_EPS, _check_grid, check_kind

# Test-only debug switch: allocate the outputs that a kernel must fully write with NaN instead of
# torch.empty, so an element the kernel skipped shows up as NaN.
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_C = 8192  # the column loop is unrolled at compile time: wider rows go to the reference
_BLOCK_ELEMS = 4096  # elements per program and chunk (rows x columns), under the interpreter too
# The combine function behind tl.sum, called through tl.reduce: tl.sum itself is a @triton.jit wrapper fixed
# as compiled or interpreted when triton is first imported, so a kernel re-decorated for the interpreter
# (tests) could not call it when triton was first imported in compiled mode. The interpreter recognises
# this combine function and reduces with numpy.
_ADD = tl.standard._sum_combine


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(rows: int, c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for rows of c columns, the same under the interpreter as on a GPU.

    A program covers BLOCK_R rows and walks their columns in BLOCK_C chunks: 256 or 128 wide when that
    divides C (768 -> 3 x 256, 384 -> 3 x 128: no masked lanes), else one masked chunk up to 256."""
    if c % 256 == 0:
        block_c = 256
    elif c % 128 == 0:
        block_c = 128
    else:
        block_c = min(triton.next_power_of_2(max(c, 1)), 256)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _BLOCK_ELEMS // block_c))
    return block_r, block_c, 4


@triton.jit
def _row_stats(t_ptr, row_base, row_ok, C: tl.constexpr, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, 1 / sqrt(var + eps)) of each row's C values, chunk by chunk: the mean first, then the centred
    squares (two passes over the row, the second from cache), as the reference computes them."""
    total = tl.full([BLOCK_R], 0.0, tl.float32)
    for c0 in tl.static_range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        t = tl.load(t_ptr + row_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        total += tl.reduce(t, 1, _ADD)
    mean = total / C
    squares = tl.full([BLOCK_R], 0.0, tl.float32)
    for c0 in tl.static_range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        t = tl.load(t_ptr + row_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        centred = tl.where(ok, t - mean[:, None], 0.0)
        squares += tl.reduce(centred * centred, 1, _ADD)
    return mean, 1.0 / tl.sqrt(squares / C + eps)


@triton.jit
def _difference(pred_ptr, target_ptr, offs, ok, mean, rstd, NORMALIZE: tl.constexpr):
    """pred - target on one chunk, in fp32, the target layer-normalised with its rows' (mean, rstd)."""
    p = tl.load(pred_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        t = (t - mean[:, None]) * rstd[:, None]
    return p - t


@triton.jit
def _loss_fwd_kernel(
    pred_ptr,  # [B, F, N, C]
    target_ptr,  # [B, F, N, C]
    hidden_ptr,  # [B, M] int64
    partial_ptr,  # [programs] fp32
    F,
    N,
    M,
    C: tl.constexpr,  # compiled per width: Triton then knows the rows' and the column mask's alignment
    ROWS,  # B * F * M
    eps,
    NORMALIZE: tl.constexpr,
    SMOOTH_L1: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    bf = rows // M  # b * F + f
    m = rows % M
    b = bf // F
    n = tl.load(hidden_ptr + b * M + m, mask=row_ok, other=0).to(tl.int64)
    row_base = (bf * N + n) * C
    mean, rstd = tl.full([BLOCK_R], 0.0, tl.float32), tl.full([BLOCK_R], 1.0, tl.float32)
    if NORMALIZE:
        mean, rstd = _row_stats(target_ptr, row_base, row_ok, C, eps, BLOCK_R, BLOCK_C)
    err_sum = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for c0 in tl.static_range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        d = _difference(pred_ptr, target_ptr, row_base[:, None] + cols[None, :], ok, mean, rstd, NORMALIZE)
        if SMOOTH_L1:
            a = tl.abs(d)
            err = tl.where(a < 1.0, 0.5 * d * d, a - 0.5)
        else:
            err = d * d
        err_sum += tl.where(ok, err, 0.0)
    tl.store(partial_ptr + pid, tl.reduce(tl.reduce(err_sum, 1, _ADD), 0, _ADD))


@triton.jit
def _loss_bwd_kernel(
    pred_ptr,  # [B, F, N, C]
    target_ptr,  # [B, F, N, C]
    count_ptr,  # [B, N] int32: how often position n is selected in sample b
    scale_ptr,  # [1] fp32: grad_output / (B * F * M * C)
    grad_ptr,  # [B, F, N, C], pred's dtype
    F,
    N,
    C: tl.constexpr,  # compiled per width: Triton then knows the rows' and the column mask's alignment
    eps,
    NORMALIZE: tl.constexpr,
    SMOOTH_L1: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    bf = tl.program_id(0).to(tl.int64)  # b * F + f
    b = bf // F
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    count = tl.load(count_ptr + b * N + rows, mask=row_ok, other=0)
    selected = row_ok & (count > 0)  # unselected rows are never read
    row_base = (bf * N + rows.to(tl.int64)) * C
    mean, rstd = tl.full([BLOCK_R], 0.0, tl.float32), tl.full([BLOCK_R], 1.0, tl.float32)
    if NORMALIZE:
        mean, rstd = _row_stats(target_ptr, row_base, selected, C, eps, BLOCK_R, BLOCK_C)
    weight = count.to(tl.float32) * tl.load(scale_ptr)
    for c0 in tl.static_range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = (cols < C)[None, :]
        load_ok = selected[:, None] & col_ok
        offs = row_base[:, None] + cols[None, :]
        d = _difference(pred_ptr, target_ptr, offs, load_ok, mean, rstd, NORMALIZE)
        if SMOOTH_L1:
            g = tl.minimum(tl.maximum(d, -1.0), 1.0)
        else:
            g = 2.0 * d
        g = tl.where(load_ok, g * weight[:, None], 0.0)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


# Whether triton wrapped the kernels for its CPU interpreter (decided when this module was imported).
INTERPRETED = type(_loss_fwd_kernel).__name__ == "InterpretedFunction"


def unsupported_reason(pred: torch.Tensor, target: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (the reference can), or None when it can."""
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} (supported: fp32, bf16, fp16)"
    if pred.dim() == 4 and pred.shape[-1] > MAX_C:
        return f"C={pred.shape[-1]} > {MAX_C} channels"
    return None


def _loss_partials(
    pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, smooth_l1: bool, normalize: bool
) -> torch.Tensor:
    b, f, n, c = pred.shape
    m = hidden.shape[1]
    rows = b * f * m
    block_r, block_c, num_warps = _blocks(rows, c)
    programs = triton.cdiv(rows, block_r) if rows * c > 0 else 0
    partials = _alloc((programs,), torch.float32, pred.device)
    if programs == 0:
        return partials
    _loss_fwd_kernel[(programs,)](
        pred,
        target,
        hidden,
        partials,
        f,
        n,
        m,
        c,
        rows,
        LAYER_NORM_EPS,
        NORMALIZE=normalize,
        SMOOTH_L1=smooth_l1,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return partials


def _pred_grad(
    pred: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor,
    smooth_l1: bool,
    normalize: bool,
) -> torch.Tensor:
    b, f, n, c = pred.shape
    grad = _alloc(tuple(pred.shape), pred.dtype, pred.device)
    if grad.numel() == 0:
        return grad
    count = torch.zeros((b, n), dtype=torch.int32, device=pred.device)
    count.scatter_add_(1, hidden, torch.ones(hidden.shape, dtype=torch.int32, device=pred.device))
    block_r, block_c, num_warps = _blocks(n, c)
    grid = (b * f, triton.cdiv(n, block_r))
    _loss_bwd_kernel[grid](
        pred,
        target,
        count,
        scale,
        grad,
        f,
        n,
        c,
        LAYER_NORM_EPS,
        NORMALIZE=normalize,
        SMOOTH_L1=smooth_l1,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return grad


class _MaskedFeatureLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, hidden, smooth_l1, normalize):
        numel = max(hidden.numel() * pred.shape[1] * pred.shape[3], 1)
        loss = _loss_partials(pred, target, hidden, smooth_l1, normalize).sum() / numel
        ctx.save_for_backward(pred, target, hidden)
        ctx.numel = numel
        ctx.smooth_l1 = smooth_l1
        ctx.normalize = normalize
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pred, target, hidden = ctx.saved_tensors
        scale = grad_output.reshape(1).to(torch.float32) / ctx.numel  # stays on device: no host sync
        grad = _pred_grad(pred, target, hidden, scale, ctx.smooth_l1, ctx.normalize)
        return grad, None, None, None, None


def masked_feature_loss_triton(
    pred: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    *,
    kind: str = "mse",
    normalize_target: bool = True,
) -> torch.Tensor:
    """Triton version of `masked_feature_loss_reference`: scalar fp32 loss, gradient for pred only.

    `hidden` must hold positions in [0, N) (ops.hidden_indices does); they are not range-checked on
    the device (that would need a host sync).
    """
    check_kind(kind)
    _check_grid(pred, target, hidden)
    reason = unsupported_reason(pred, target)
    if reason is not None:
        raise ValueError(f'the Triton masked feature loss does not take {reason}; use impl="reference"')
    if not (pred.device == target.device == hidden.device):
        raise ValueError(
            f"pred, target and hidden must be on one device, got {pred.device}, {target.device}, "
            f"{hidden.device}"
        )
    return _MaskedFeatureLoss.apply(
        pred.contiguous(),
        target.detach().contiguous(),
        hidden.to(torch.int64).contiguous(),
        kind == "smooth_l1",
        normalize_target,
    )
