"""Blockwise tube masking: exact count, tube property, blocks, reproducibility, uniform coverage."""

from __future__ import annotations

import pytest
import torch

from miles_kernels import ops
from miles_kernels.tube_mask import hash32


@pytest.mark.parametrize(
    "grid,ratio", [((14, 14), 0.5), ((14, 14), 0.75), ((8, 8), 0.5), ((7, 9), 0.3), ((4, 4), 0.9)]
)
def test_exact_count_and_visible_indices(grid: tuple[int, int], ratio: float) -> None:
    n = grid[0] * grid[1]
    mask, visible = ops.tube_mask(16, grid, ratio, seed=3, step=5)
    m = round(ratio * n)
    assert mask.shape == (16, n) and mask.dtype == torch.bool
    assert (mask.sum(1) == m).all()
    assert visible.shape == (16, n - m) and visible.dtype == torch.int64
    assert (visible[:, 1:] > visible[:, :-1]).all()  # sorted, distinct
    assert not mask.gather(1, visible).any()  # visible really are visible
    hidden = ops.hidden_indices(mask, m)
    assert hidden.shape == (16, m) and mask.gather(1, hidden).all()


def test_ratio_zero_hides_nothing() -> None:
    mask, visible = ops.tube_mask(3, (4, 5), 0.0, seed=0)
    assert not mask.any() and torch.equal(visible, torch.arange(20).expand(3, 20))


def test_reproducible_for_seed_and_step_and_varies_otherwise() -> None:
    a, _ = ops.tube_mask(8, (14, 14), 0.5, seed=7, step=11)
    b, _ = ops.tube_mask(8, (14, 14), 0.5, seed=7, step=11)
    c, _ = ops.tube_mask(8, (14, 14), 0.5, seed=7, step=12)
    d, _ = ops.tube_mask(8, (14, 14), 0.5, seed=8, step=11)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert len({tuple(row.tolist()) for row in a}) == 8  # samples differ from each other


def test_sample_mask_does_not_depend_on_batch_size() -> None:
    small, _ = ops.tube_mask(3, (14, 14), 0.5, seed=1, step=2)
    large, _ = ops.tube_mask(10, (14, 14), 0.5, seed=1, step=2)
    assert torch.equal(small, large[:3])


def _hidden_neighbour_fraction(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    g = mask.reshape(-1, *grid).float()
    pad = torch.nn.functional.pad(g, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    count = torch.nn.functional.pad(torch.ones_like(g), (1, 1, 1, 1))
    valid = count[:, :-2, 1:-1] + count[:, 2:, 1:-1] + count[:, 1:-1, :-2] + count[:, 1:-1, 2:]
    return float(((neighbours / valid) * g).sum() / g.sum())


def test_blockwise_structure() -> None:
    """Hidden patches cluster: far more hidden neighbours than a scattered mask of the same ratio."""
    grid, ratio = (14, 14), 0.5
    mask, _ = ops.tube_mask(256, grid, ratio, seed=0, step=0)
    blockwise = _hidden_neighbour_fraction(mask, grid)
    g = torch.Generator().manual_seed(0)
    scattered = torch.zeros(256, 196, dtype=torch.bool)
    scattered.scatter_(1, torch.rand(256, 196, generator=g).argsort(1)[:, :98], True)
    random_level = _hidden_neighbour_fraction(scattered, grid)
    assert random_level == pytest.approx(0.5, abs=0.03)
    assert blockwise > 0.75


def test_every_position_hidden_about_equally_often() -> None:
    mask, _ = ops.tube_mask(4000, (14, 14), 0.5, seed=2, step=0)
    freq = mask.float().mean(0)
    assert freq.min() > 0.45 and freq.max() < 0.55


def test_hash_is_a_32_bit_permutation_sample() -> None:
    x = torch.arange(1 << 16, dtype=torch.int64)
    h = hash32(x)
    assert h.min() >= 0 and h.max() < 2**32
    assert h.unique().numel() == x.numel()  # bijective on 32 bits, so no collisions here
    assert hash32(torch.tensor([0x12345678])).item() == hash32(torch.tensor([0x12345678])).item()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ratio"):
        ops.tube_mask(2, (4, 4), 1.2, seed=0)
    with pytest.raises(ValueError, match="impl"):
        ops.tube_mask(2, (4, 4), 0.5, seed=0, impl="cuda")
