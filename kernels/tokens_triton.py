"""Triton kernels for masked-token dropping and restoring, with hand-written backward passes.

Forward kernels:

* `_gather_rows_kernel`: one program per (b, block of the F*K output rows) x block of C. It loads the
  visible indices of its rows, gathers those rows of the [B, F, N, C] input and (optionally) adds the pos
  row and the time row. Used by `drop_tokens` forward and by the `restore_tokens` backward (gradient of y,
  no embeddings).
* `_scatter_rows_kernel`: one pass over the full [B, F, N, C] grid, one program per (b, block of the F*N
  output rows) x block of C. A tiny on-device inverse index `slot [B, N] int32` (k, or -1 for a hidden
  position; built with a torch scatter, no host sync) says where each row comes from: y[b, f, slot] or the
  mask token (or 0), plus (optionally) pos[n] + time[f]. Every output row is written, so no separate zero
  fill is needed. Used by `restore_tokens` forward and by the `drop_tokens` backward (gradient of x).

Rows are blocked across frames (F*K = 196 rows of a sample at K = 49, not 49 per frame in 16-row blocks that
leave a quarter-empty block per frame), and blocks are small (2048 elements) so that a batch of 8 already
gives several programs per SM; columns go in 256- or 128-wide blocks that divide C when they can.

All arithmetic is in fp32 (loads are converted right away, stores go back to the output dtype), so bf16
inputs are accumulated in fp32. The reductions of the backward passes (gradients of pos, time, mask token)
are torch sums / index_add_ in fp32, returned in the parameters' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miles_kernels.tokens import _check

# Test-only debug switch: allocate the outputs that a kernel must fully write with NaN instead of
# torch.empty, so an element the kernel skipped shows up as NaN.
POISON_OUTPUTS = False

_MAX_BLOCK_C = 256
_BLOCK_ELEMS = 2048  # elements per program (rows x columns), under the interpreter too: tests run the GPU's
_NUM_WARPS = 4


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(rows: int, c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): columns 256 or 128 wide when that divides C (no masked lanes), rows to fill
    _BLOCK_ELEMS; the same under the interpreter as on a GPU."""
    if c % 256 == 0:
        block_c = 256
    elif c % 128 == 0:
        block_c = 128
    else:
        block_c = min(triton.next_power_of_2(max(c, 1)), _MAX_BLOCK_C)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _BLOCK_ELEMS // block_c))
    return block_r, block_c


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [B, F, N, C]
    visible_ptr,  # [B, K] int64
    pos_ptr,  # [N, C]
    time_ptr,  # [>= F, C]
    out_ptr,  # [B, F, K, C]
    F,
    N,
    K,
    C,
    HAS_EMB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows f * K + j of sample b
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < F * K
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    f = (rows // K).to(tl.int64)
    j = rows - (rows // K) * K

    n = tl.load(visible_ptr + b * K + j, mask=row_ok, other=0).to(tl.int64)
    val = tl.load(src_ptr + ((b * F + f) * N + n)[:, None] * C + cols[None, :], mask=ok, other=0.0)
    val = val.to(tl.float32)
    if HAS_EMB:
        p = tl.load(pos_ptr + n[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        t = tl.load(time_ptr + f[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        val = val + p + t
    out_offs = (b * F * K + rows.to(tl.int64))[:, None] * C + cols[None, :]
    tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter_rows_kernel(
    src_ptr,  # [B, F, K, C]
    slot_ptr,  # [B, N] int32: k, or -1 when hidden
    mask_ptr,  # [C]
    pos_ptr,  # [N, C]
    time_ptr,  # [>= F, C]
    out_ptr,  # [B, F, N, C]
    F,
    N,
    K,
    C,
    HAS_MASK: tl.constexpr,
    HAS_EMB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows f * N + n of sample b
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < F * N
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    f = (rows // N).to(tl.int64)
    n = (rows - (rows // N) * N).to(tl.int64)

    s = tl.load(slot_ptr + b * N + n, mask=row_ok, other=-1)
    vis = s >= 0
    k = tl.where(vis, s, 0).to(tl.int64)
    src_offs = ((b * F + f) * K + k)[:, None] * C + cols[None, :]
    val = tl.load(src_ptr + src_offs, mask=ok & vis[:, None], other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(mask_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        val = tl.where(vis[:, None], val, m[None, :])
    if HAS_EMB:
        p = tl.load(pos_ptr + n[:, None] * C + cols[None, :], mask=ok, other=0.0)
        t = tl.load(time_ptr + f[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        val = val + p.to(tl.float32) + t
    out_offs = (b * F * N + rows.to(tl.int64))[:, None] * C + cols[None, :]
    tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=ok)


# Whether triton wrapped the kernels for its CPU interpreter (decided when this module was imported).
INTERPRETED = type(_gather_rows_kernel).__name__ == "InterpretedFunction"


def _gather(
    src: torch.Tensor,
    visible: torch.Tensor,
    pos: torch.Tensor | None,
    time: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """src [B, F, N, C] -> src[:, :, visible] (+ pos[visible] + time[:F]) as [B, F, K, C] in out_dtype."""
    b, f, n, c = src.shape
    k = visible.shape[1]
    out = _alloc((b, f, k, c), out_dtype, src.device)
    if out.numel() == 0:
        return out
    has_emb = pos is not None
    block_r, block_c = _blocks(f * k, c)
    grid = (b, triton.cdiv(f * k, block_r), triton.cdiv(c, block_c))
    _gather_rows_kernel[grid](
        src,
        visible,
        pos if has_emb else src,
        time if has_emb else src,
        out,
        f,
        n,
        k,
        c,
        HAS_EMB=has_emb,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_NUM_WARPS,
    )
    return out


def _scatter(
    src: torch.Tensor,
    slot: torch.Tensor,
    n: int,
    mask_token: torch.Tensor | None,
    pos: torch.Tensor | None,
    time: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """src [B, F, K, C] -> [B, F, N, C]: src rows at visible, mask_token (or 0) elsewhere (+ pos + time)."""
    b, f, k, c = src.shape
    out = _alloc((b, f, n, c), out_dtype, src.device)
    if out.numel() == 0:
        return out
    has_mask = mask_token is not None
    has_emb = pos is not None
    block_r, block_c = _blocks(f * n, c)
    grid = (b, triton.cdiv(f * n, block_r), triton.cdiv(c, block_c))
    _scatter_rows_kernel[grid](
        src,
        slot,
        mask_token if has_mask else src,
        pos if has_emb else src,
        time if has_emb else src,
        out,
        f,
        n,
        k,
        c,
        HAS_MASK=has_mask,
        HAS_EMB=has_emb,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_NUM_WARPS,
    )
    return out


def _slot(visible: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse index [B, N] int32: slot[b, visible[b, k]] = k, -1 for hidden positions (on device)."""
    b, k = visible.shape
    slot = torch.full((b, n), -1, dtype=torch.int32, device=visible.device)
    ks = torch.arange(k, dtype=torch.int32, device=visible.device).expand(b, k)
    return slot.scatter_(1, visible, ks)


def _time_grad(g: torch.Tensor, time_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """g [B, F, R, C] summed over B and R in fp32 -> [time_rows, C] in dtype (rows past F get 0)."""
    f = g.shape[1]
    per_frame = g.sum((0, 2), dtype=torch.float32)
    if time_rows == f:
        return per_frame.to(dtype)
    out = torch.zeros((time_rows, g.shape[3]), dtype=torch.float32, device=g.device)
    out[:f] = per_frame
    return out.to(dtype)


def _prepare(visible: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device = tensors[0].device
    for t in (visible, *tensors):
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {device}")
    if visible.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"visible must be an integer index tensor, got {visible.dtype}")
    return (visible.to(torch.int64).contiguous(), *(t.contiguous() for t in tensors))


class _DropTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, visible, pos, time):
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(pos.dtype, time.dtype))
        out = _gather(x, visible, pos, time, out_dtype)
        ctx.save_for_backward(visible)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.pos_dtype = pos.dtype
        ctx.time_rows = time.shape[0]
        ctx.time_dtype = time.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        (visible,) = ctx.saved_tensors
        b, f, n, c = ctx.x_shape
        k = visible.shape[1]
        g = g.contiguous()
        grad_x = grad_pos = grad_time = None
        if ctx.needs_input_grad[0]:
            grad_x = _scatter(g, _slot(visible, n), n, None, None, None, ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            per_row = g.sum(1, dtype=torch.float32).reshape(b * k, c)
            grad_pos = torch.zeros((n, c), dtype=torch.float32, device=g.device)
            grad_pos.index_add_(0, visible.reshape(-1), per_row)
            grad_pos = grad_pos.to(ctx.pos_dtype)
        if ctx.needs_input_grad[3]:
            grad_time = _time_grad(g, ctx.time_rows, ctx.time_dtype)
        return grad_x, None, grad_pos, grad_time


class _RestoreTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, visible, mask_token, pos, time):
        n = pos.shape[0]
        out_dtype = torch.promote_types(y.dtype, torch.promote_types(pos.dtype, time.dtype))
        slot = _slot(visible, n)
        # The reference fills the grid with mask_token.to(y.dtype): round it the same way.
        mask = mask_token.to(y.dtype).reshape(-1).contiguous()
        out = _scatter(y, slot, n, mask, pos, time, out_dtype)
        ctx.save_for_backward(visible, slot)
        ctx.y_dtype = y.dtype
        ctx.mask_dtype = mask_token.dtype
        ctx.mask_shape = mask_token.shape
        ctx.pos_dtype = pos.dtype
        ctx.time_rows = time.shape[0]
        ctx.time_dtype = time.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        visible, slot = ctx.saved_tensors
        g = g.contiguous()
        grad_y = grad_mask = grad_pos = grad_time = None
        if ctx.needs_input_grad[0]:
            grad_y = _gather(g, visible, None, None, ctx.y_dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            per_pos = g.sum(1, dtype=torch.float32)  # [B, N, C]
            if ctx.needs_input_grad[2]:
                hidden = (slot < 0).to(torch.float32)  # [B, N]
                grad_mask = torch.einsum("bnc,bn->c", per_pos, hidden)
                grad_mask = grad_mask.to(ctx.mask_dtype).reshape(ctx.mask_shape)
            if ctx.needs_input_grad[3]:
                grad_pos = per_pos.sum(0).to(ctx.pos_dtype)
        if ctx.needs_input_grad[4]:
            grad_time = _time_grad(g, ctx.time_rows, ctx.time_dtype)
        return grad_y, None, grad_mask, grad_pos, grad_time


def drop_tokens_triton(
    x: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, time: torch.Tensor
) -> torch.Tensor:
    """Triton version of `drop_tokens_reference`: x[:, :, visible] + pos[visible] + time[:F]."""
    _check(x, visible, pos, time, x.shape[2])
    visible, x, pos, time = _prepare(visible, x, pos, time)
    return _DropTokens.apply(x, visible, pos, time)


def restore_tokens_triton(
    y: torch.Tensor, visible: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, time: torch.Tensor
) -> torch.Tensor:
    """Triton version of `restore_tokens_reference`: the full grid, mask_token at hidden positions."""
    n = pos.shape[0]
    _check(y, visible, pos, time, n)
    c = y.shape[3]
    if mask_token.dim() == 0 or mask_token.shape[-1] != c or mask_token.numel() != c:
        raise ValueError(
            f"mask_token must hold C={c} values ([C] or [1, ..., C]), got {tuple(mask_token.shape)}"
        )
    visible, y, mask_token, pos, time = _prepare(visible, y, mask_token, pos, time)
    return _RestoreTokens.apply(y, visible, mask_token, pos, time)
