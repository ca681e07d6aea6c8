"""Blockwise tube masking in Triton, bit-identical to `miles_kernels.tube_mask.tube_mask_reference`.

Three small launches, no host round trip (no `.item()` / `.cpu()`):

1. `_tube_keys_kernel` (grid `[B, cdiv(N, BLOCK_N)]`): every program rebuilds the 32 rectangles of its
   sample from the counter hash (a `[32]` vector, integer square root by bisection on bits, no float),
   covers a `[32, BLOCK_N]` tile of positions on the torus and writes `key = (best << 32) | jitter`.
2. `_tube_rank_kernel` (grid `[B, cdiv(N, BLOCK_I)]`): rank[i] = #{j : key[j] > key[i] or (key[j] == key[i]
   and j < i)}, i.e. the position of i in the reference's stable descending argsort, by `[BLOCK_I, BLOCK_J]`
   comparison tiles looped over the row; hidden = rank < m.
3. `_tube_visible_kernel` (grid `[B]`): visible positions in ascending order by a running prefix sum
   of the visible flags, chunk by chunk.

Reductions and the scan call `tl.reduce` / `tl.associative_scan` with triton's own combine functions
instead of `tl.max` / `tl.sum` / `tl.cumsum`, which are @triton.jit wrappers in triton.language.standard
fixed as compiled or interpreted when triton is first imported: this module can then be re-decorated for the
interpreter (a fresh import with TRITON_INTERPRET=1) even when triton itself was first imported in
compiled mode, as happens in a full test session where other modules import triton first.

All hashing is int64 arithmetic on values below 2**32, the multiplication mod 2**32 split into 16-bit
halves exactly as the reference, so the GPU, the Triton interpreter and PyTorch agree bit for bit.
The (seed, step) part of the hash is folded on the host into one 32-bit `base`, passed as two 16-bit
halves so that no kernel argument overflows int32 or gets typed uint32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miles_kernels.tube_mask import (
    ASPECT_DEN,
    ASPECT_MIN_NUM,
    NUM_RECTANGLES,
    mask_sizes,
    nothing_hidden,
    rectangle_areas,
)

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# The combine functions behind tl.sum / tl.max / tl.cumsum: the interpreter recognises them by identity and
# runs numpy (a local combine function would be interpreted element by element, ~100x slower).
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max

# Positions per program of the key kernel ([32, BLOCK] int32 coverage tile) and rows of the rank kernel's
# [rows, BLOCK_J] int64 comparison tile: the largest power of two up to the cap that still gives every SM of
# an H100 (132) a program, down to 8 (`_rows_per_program`). ViT-B/16 at batch 8: 8 rows, 200 programs.
MAX_BLOCK_N = 64
MAX_BLOCK_I = 32
MIN_BLOCK = 8
SMS = 132
BLOCK_J = 128  # columns of the rank comparison tile
BLOCK_V = 1024  # chunk of the visible-index scan


@triton.jit
def _mul32(x, hi: tl.constexpr, lo: tl.constexpr):
    """(x * (hi << 16 | lo)) mod 2**32 for 0 <= x < 2**32 in int64, as the reference's `_mul32`."""
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _hash32(x):
    """lowbias32 on int64 values, identical to `miles_kernels.tube_mask.hash32`."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB, 0x352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846C, 0xA68B)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _uniform_int(h, n):
    return ((h >> 8) * n) >> 24


@triton.jit
def _isqrt(x):
    """floor(sqrt(x)) for 0 <= x < 2**48, integer only (one bit per step, most significant first)."""
    r = x * 0
    for i in tl.static_range(24):
        cand = r + (1 << (23 - i))
        r = tl.where(cand * cand <= x, cand, r)
    return r


@triton.jit
def _unary_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    """Test hook: out = hash32(x) (OP 0) or isqrt(x) (OP 1), elementwise on int64."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    if OP == 0:
        y = _hash32(x)
    else:
        y = _isqrt(x)
    tl.store(out_ptr + offs, y, mask=ok)


@triton.jit
def _tube_keys_kernel(
    keys_ptr,
    base_hi,
    base_lo,
    n,
    gh,
    gw,
    lo_area,
    area_span,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKWISE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = tl.cast(base_hi, tl.int64) * 65536 + tl.cast(base_lo, tl.int64)  # scalar args may be specialised
    hs = _hash32(base ^ b)  # hash32(base ^ sample)
    pos = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = pos < n
    jitter = _hash32(hs ^ (pos + 4 * R))
    if BLOCKWISE:
        best = _rectangle_priority(hs, pos, gh, gw, lo_area, area_span, R)
        key = (best << 32) | jitter
    else:  # random positions: the jitter alone ranks them
        key = jitter
    tl.store(keys_ptr + b * n + pos, key, mask=ok)


@triton.jit
def _rectangle_priority(hs, pos, gh, gw, lo_area, area_span, R: tl.constexpr):
    """Per position: R - (index of the first of the sample's R rectangles that covers it), 0 if none."""
    r = tl.arange(0, R).to(tl.int64)
    c = r * 4
    h_area = _hash32(hs ^ c)
    h_aspect = _hash32(hs ^ (c + 1))
    h_top = _hash32(hs ^ (c + 2))
    h_left = _hash32(hs ^ (c + 3))
    area = lo_area + _uniform_int(h_area, area_span)
    h_lo = tl.maximum(_isqrt((area * 3) // 10), 1)  # ASPECT_MIN_NUM / ASPECT_DEN
    h_hi = tl.maximum(h_lo, tl.minimum(_isqrt((area * 10) // 3), gh))
    h_lo = tl.minimum(h_lo, h_hi)
    rect_h = h_lo + _uniform_int(h_aspect, h_hi - h_lo + 1)
    rect_w = tl.minimum(tl.maximum((area + rect_h // 2) // rect_h, 1), gw)
    top = _uniform_int(h_top, gh)
    left = _uniform_int(h_left, gw)

    # The [R, BLOCK] coverage tile in int32 (every value here is below 2**16) and without a division: the
    # distance on the torus is a difference wrapped once, since rows, columns, tops and lefts are in range.
    pos32 = pos.to(tl.int32)
    row = pos32 // gw
    col = pos32 - row * gw
    dr = row[None, :] - top.to(tl.int32)[:, None]
    dr = tl.where(dr < 0, dr + gh, dr)
    dc = col[None, :] - left.to(tl.int32)[:, None]
    dc = tl.where(dc < 0, dc + gw, dc)
    covered = (dr < rect_h.to(tl.int32)[:, None]) & (dc < rect_w.to(tl.int32)[:, None])  # [R, BLOCK]
    priority = tl.where(covered, R - r.to(tl.int32)[:, None], 0)
    return tl.reduce(priority, 0, _MAX).to(tl.int64)


@triton.jit
def _tube_rank_kernel(keys_ptr, mask_ptr, n, m, BI: tl.constexpr, BJ: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    ok_i = i < n
    row = keys_ptr + b * n
    ki = tl.load(row + i, mask=ok_i, other=0)
    count = tl.full((BI,), 0, tl.int32)
    for start in range(0, n, BJ):
        j = start + tl.arange(0, BJ)
        ok_j = j < n
        kj = tl.load(row + j, mask=ok_j, other=0)
        ahead = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        ahead = ahead & ok_j[None, :]
        count += tl.reduce(ahead.to(tl.int32), 1, _ADD)
    hidden = (count < m).to(tl.uint8)
    tl.store(mask_ptr + b * n + i, hidden, mask=ok_i)


@triton.jit
def _tube_visible_kernel(mask_ptr, visible_ptr, n, k, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    carry = tl.program_id(0) * 0  # int32 running count of visible positions
    for start in range(0, n, BLOCK):
        p = start + tl.arange(0, BLOCK)
        ok = p < n
        hidden = tl.load(mask_ptr + b * n + p, mask=ok, other=1)
        vis = (hidden == 0).to(tl.int32)
        slot = carry + tl.associative_scan(vis, 0, _ADD) - 1
        tl.store(visible_ptr + b * k + slot, p.to(tl.int64), mask=ok & (vis == 1))
        carry += tl.reduce(vis, 0, _ADD)


INTERPRETED = type(_tube_keys_kernel).__name__ == "InterpretedFunction"


def _rows_per_program(batch: int, n: int, largest: int) -> int:
    block = largest
    while block > MIN_BLOCK and batch * triton.cdiv(n, block) < SMS:
        block //= 2
    return block


def _hash32_host(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def _base(seed: int, step: int) -> int:
    """hash32(hash32((seed mod 2**32) ^ golden) ^ (step mod 2**32)), the (seed, step) part of counter_hash."""
    return _hash32_host(_hash32_host((seed & MASK32) ^ _GOLDEN) ^ (step & MASK32))


def _unary(x: torch.Tensor, op: int) -> torch.Tensor:
    x = x.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        _unary_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), OP=op, BLOCK=block)
    return out


def hash32_triton(x: torch.Tensor) -> torch.Tensor:
    """Elementwise `hash32` of an int64 tensor through the kernels' device function (for testing)."""
    return _unary(x, 0)


def isqrt_triton(x: torch.Tensor) -> torch.Tensor:
    """Elementwise floor(sqrt(x)) of an int64 tensor in [0, 2**48) via the device function (for testing)."""
    return _unary(x, 1)


def tube_mask_triton(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    seed: int,
    step: int = 0,
    device: torch.device | str | None = None,
    min_area: int = 4,
    blockwise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bits as `tube_mask_reference`: (mask [B, N] bool, visible [B, K] int64 sorted)."""
    gh, gw = grid
    n, m, k = mask_sizes(batch, grid, ratio)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if m == 0:
        return nothing_hidden(batch, n, device)
    assert ASPECT_MIN_NUM == 3 and ASPECT_DEN == 10, "the key kernel hard-codes the 0.3 aspect bound"

    lo_area, max_area = rectangle_areas(n, m, min_area)
    base = _base(seed, step)

    keys = torch.empty(batch, n, dtype=torch.int64, device=device)
    block_n = _rows_per_program(batch, n, MAX_BLOCK_N)
    _tube_keys_kernel[(batch, triton.cdiv(n, block_n))](
        keys,
        base >> 16,
        base & 0xFFFF,
        n,
        gh,
        gw,
        lo_area,
        max_area - lo_area + 1,
        R=NUM_RECTANGLES,
        BLOCK=block_n,
        BLOCKWISE=blockwise,
    )
    mask_u8 = torch.empty(batch, n, dtype=torch.uint8, device=device)
    block_i = _rows_per_program(batch, n, MAX_BLOCK_I)
    _tube_rank_kernel[(batch, triton.cdiv(n, block_i))](keys, mask_u8, n, m, BI=block_i, BJ=BLOCK_J)
    visible = torch.empty(batch, k, dtype=torch.int64, device=device)
    if k > 0:
        _tube_visible_kernel[(batch,)](mask_u8, visible, n, k, BLOCK=BLOCK_V)
    return mask_u8.view(torch.bool), visible
