"""Blockwise tube masking from a counter-based hash: the plain PyTorch reference.

Every random number is a pure function of (seed, step, sample, counter) built from 32-bit integer
hashing, so a resumed run masks exactly as an uninterrupted one and any device (or a Triton kernel
later) can reproduce the mask bit for bit without a host round trip or a device RNG.

The mask is spatial (`[B, N]` over the `h x w` patch grid) and is applied identically to every frame:
that is the "tube". Blocks come from BEiT-style random rectangles (placed on the grid as a torus);
the positions of each sample are ranked by an integer key (the priority of the first rectangle that
covers it, then a hash) and the `round(ratio * N)` highest keys are hidden, which gives an exact count
and whole blocks.

The ablations' other mask types reuse this one generator: `random_tube` ranks positions by the hash
alone (`blockwise=False`); the per-frame types (`block_frame`, `random_frame`) treat every (sample,
frame) pair as its own sample, `B * F` rows, so each frame gets an independent mask of the same size.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
NUM_RECTANGLES = 32
ASPECT_MIN_NUM, ASPECT_DEN = 3, 10  # rectangle aspect ratio h/w within [0.3, 1/0.3], as BEiT


def _mul32(x: torch.Tensor, const: int) -> torch.Tensor:
    """(x * const) mod 2**32 for x < 2**32 in int64 without signed overflow (split the constant)."""
    lo = const & 0xFFFF
    hi = const >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): good avalanche, only xor, shift and multiply."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def counter_hash(seed: int, step: int, sample: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """hash(seed, step, sample, counter) as nested hashing; all arguments are reduced mod 2**32."""
    base = hash32(torch.tensor((seed & MASK32) ^ 0x9E3779B9, dtype=torch.int64, device=sample.device))
    base = hash32(base ^ (step & MASK32))
    h = hash32(base ^ (sample & MASK32))
    return hash32(h ^ (counter & MASK32))


def _uniform_int(h: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """An integer in [0, n) from the top 24 bits of a hash, exactly (no floating point)."""
    return ((h >> 8) * n) >> 24


def _isqrt(x: torch.Tensor) -> torch.Tensor:
    r = torch.sqrt(x.to(torch.float64)).floor().to(torch.int64)
    r = torch.where((r + 1) * (r + 1) <= x, r + 1, r)
    return torch.where(r * r > x, r - 1, r)


def num_hidden(num_patches: int, ratio: float) -> int:
    return int(round(ratio * num_patches))


def mask_sizes(batch: int, grid: tuple[int, int], ratio: float) -> tuple[int, int, int]:
    """(N positions, M hidden, K visible), refusing impossible arguments; shared by every implementation."""
    gh, gw = grid
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if gh < 1 or gw < 1 or batch < 1:
        raise ValueError(f"batch and grid must be positive, got batch={batch}, grid={grid}")
    n = gh * gw
    m = num_hidden(n, ratio)
    return n, m, n - m


def rectangle_areas(n: int, m: int, min_area: int) -> tuple[int, int]:
    """(smallest, largest) area of one masking rectangle: at most 40 % of the grid and never more than the
    m positions to hide; every implementation draws areas from this range."""
    max_area = max(min(m, (2 * n) // 5), min(min_area, m))
    return min(min_area, max_area), max_area


def nothing_hidden(batch: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    return mask, torch.arange(n, device=device).expand(batch, n).clone()


def tube_mask_reference(
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
    """Returns (mask [B, N] bool, True = hidden; visible [B, K] int64 sorted ascending).

    `blockwise=False` hides uniformly random positions instead of whole rectangles: the same hash jitter
    ranks them, so both variants share one code path and one Triton kernel.
    """
    n, m, _ = mask_sizes(batch, grid, ratio)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if m == 0:
        return nothing_hidden(batch, n, device)
    samples = torch.arange(batch, device=device, dtype=torch.int64)
    pos = torch.arange(n, device=device, dtype=torch.int64)
    jitter = counter_hash(seed, step, samples[:, None].expand(batch, n), pos[None, :] + 4 * NUM_RECTANGLES)
    if blockwise:
        best = _rectangle_priority(seed, step, samples, pos, grid, n, m, min_area)
        key = (best << 32) | jitter  # unique with overwhelming probability; ties fall back to position
    else:
        key = jitter
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    hidden = order[:, :m]
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, hidden, True)
    visible = order[:, m:].sort(dim=1).values  # no nonzero(): its data-dependent shape syncs the host
    return mask, visible


def _rectangle_priority(
    seed: int,
    step: int,
    samples: torch.Tensor,
    pos: torch.Tensor,
    grid: tuple[int, int],
    n: int,
    m: int,
    min_area: int,
) -> torch.Tensor:
    """[B, N]: R - (index of the first of the sample's R rectangles covering the position), 0 if none."""
    gh, gw = grid
    device = samples.device

    # Rectangles: area in [min_area, max_area], aspect within [0.3, 3.33], random placement.
    lo_area, max_area = rectangle_areas(n, m, min_area)
    r = torch.arange(NUM_RECTANGLES, device=device, dtype=torch.int64)
    counters = samples[:, None] * 0 + r[None, :] * 4  # [B, R]
    sample_ids = samples[:, None].expand_as(counters)
    h_area = counter_hash(seed, step, sample_ids, counters)
    h_aspect = counter_hash(seed, step, sample_ids, counters + 1)
    h_top = counter_hash(seed, step, sample_ids, counters + 2)
    h_left = counter_hash(seed, step, sample_ids, counters + 3)
    area = lo_area + _uniform_int(h_area, max_area - lo_area + 1)
    h_lo = torch.clamp(_isqrt((area * ASPECT_MIN_NUM) // ASPECT_DEN), min=1)
    h_hi = torch.maximum(h_lo, torch.clamp(_isqrt((area * ASPECT_DEN) // ASPECT_MIN_NUM), max=gh))
    h_lo = torch.minimum(h_lo, h_hi)
    rect_h = h_lo + _uniform_int(h_aspect, h_hi - h_lo + 1)
    rect_w = torch.clamp((area + rect_h // 2) // rect_h, 1, gw)
    top = _uniform_int(h_top, gh)  # placement wraps around the grid edges (a torus) so that every
    left = _uniform_int(h_left, gw)  # position is hidden equally often; BEiT's clipping favours the centre

    row, col = pos // gw, pos % gw  # [N]
    covered = (((row[None, None, :] - top[..., None]) % gh) < rect_h[..., None]) & (
        ((col[None, None, :] - left[..., None]) % gw) < rect_w[..., None]
    )  # [B, R, N]
    priority = (NUM_RECTANGLES - r)[None, :, None] * covered  # earlier rectangle, higher priority
    return priority.amax(dim=1)  # [B, N]; 0 where no rectangle covers


def hidden_indices(mask: torch.Tensor, num_hidden: int) -> torch.Tensor:
    """[B, N] bool with `num_hidden` True per row -> [B, M] hidden positions, ascending.

    A stable sort puts hidden positions first in order; unlike `nonzero` it needs no host sync.
    """
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :num_hidden]
