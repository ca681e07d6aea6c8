"""The Triton tube mask is bit-identical to the PyTorch reference (Triton interpreter on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import import_interpreted, interpreter_loop_bound_problem

# The rank kernel loops over the token count, a runtime argument. Where the interpreter itself cannot run
# such a loop (Triton 3.6 with NumPy 2, the xformers profile's pair), these CPU tests cannot run at all;
# the compiled kernel is checked by tests/test_kernels_compile.py and, on a GPU, tests/test_kernels_cuda.py.
_problem = interpreter_loop_bound_problem()
if _problem:
    pytest.skip(_problem, allow_module_level=True)

ref = importlib.import_module("miles_kernels.tube_mask")  # the reference module, not ops.tube_mask
tmt = import_interpreted("miles_kernels.tube_mask_triton")
DEVICE = "cpu"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 around each test: triton reads it again at the first launch (a lazy import)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    seed: int,
    step: int,
    min_area: int = 4,
    blockwise: bool = True,
) -> None:
    kwargs = dict(seed=seed, step=step, min_area=min_area, device=DEVICE, blockwise=blockwise)
    mask_ref, vis_ref = ref.tube_mask_reference(batch, grid, ratio, **kwargs)
    mask, vis = tmt.tube_mask_triton(batch, grid, ratio, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == mask_ref.shape
    assert vis.dtype == torch.int64 and vis.shape == vis_ref.shape
    assert torch.equal(mask, mask_ref), (batch, grid, ratio, seed, step, min_area)
    assert torch.equal(vis, vis_ref), (batch, grid, ratio, seed, step, min_area)


def test_hash32_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.arange(0, 4096),
            torch.randint(0, 2**32, (8192,), generator=g),
            torch.tensor([2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**31 + 5, 2**32 - 2, 2**32 - 1]),
        ]
    )
    x = x.to(DEVICE)
    assert torch.equal(tmt.hash32_triton(x), ref.hash32(x))


def test_host_base_matches_counter_hash() -> None:
    sample = torch.arange(5)
    counter = torch.arange(5) * 7
    for seed, step in [(0, 0), (1, 2), (2**31 + 5, 10**9), (2**32 + 1, 2**32 - 1), (-3, 12345)]:
        base = torch.tensor(tmt._base(seed, step))
        expected = ref.counter_hash(seed, step, sample, counter)
        assert torch.equal(ref.hash32(ref.hash32(base ^ sample) ^ counter), expected)


def test_isqrt_matches_reference() -> None:
    x = torch.cat([torch.arange(0, 5000), torch.arange(0, 70) ** 2 - 1, torch.tensor([2**32 - 1, 2**40 + 3])])
    x = x.clamp(min=0).to(DEVICE)
    assert torch.equal(tmt.isqrt_triton(x), ref._isqrt(x))


GRIDS = [(14, 14), (7, 7), (8, 8), (7, 9), (1, 5), (9, 7), (16, 16)]
RATIOS = [0.1, 0.5, 0.75, 0.9]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_bit_identical_small_grids(grid: tuple[int, int], ratio: float) -> None:
    for seed, step in [(0, 0), (2**31 + 5, 10**9), (2**32 + 1, 3)]:
        _check(3, grid, ratio, seed, step)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_bit_identical_large_grid(ratio: float) -> None:
    _check(2, (32, 32), ratio, seed=7, step=123456789)


@pytest.mark.parametrize("seed,step", [(0, 0), (1, 1), (2**31 + 5, 10**9), (2**32 + 1, 999_999_937), (-1, 5)])
def test_bit_identical_seeds_and_steps(seed: int, step: int) -> None:
    _check(4, (14, 14), 0.75, seed, step)
    _check(2, (7, 9), 0.5, seed, step)


@pytest.mark.parametrize("min_area", [1, 4, 16])
def test_bit_identical_min_area(min_area: int) -> None:
    _check(3, (14, 14), 0.6, seed=11, step=2, min_area=min_area)
    _check(3, (3, 4), 0.4, seed=11, step=2, min_area=min_area)


def test_ratio_zero_and_all_hidden() -> None:
    _check(3, (4, 5), 0.0, seed=0, step=0)
    _check(2, (14, 14), 0.0, seed=5, step=9)
    _check(2, (1, 5), 0.95, seed=1, step=1)  # round(0.95 * 5) = 5: every position hidden, K = 0


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        tmt.tube_mask_triton(2, (4, 4), 1.0, seed=0)
    with pytest.raises(ValueError):
        tmt.tube_mask_triton(0, (4, 4), 0.5, seed=0)


def test_dispatch_triton_matches_reference() -> None:
    """`impl="triton"` reaches the kernel through the one dispatch point (interpreted here; compiled on a
    GPU in tests/test_kernels_cuda.py)."""
    from miles_kernels import ops

    for grid, ratio in [((14, 14), 0.75), ((7, 9), 0.5), ((4, 5), 0.0)]:
        got = ops.tube_mask(3, grid, ratio, seed=9, step=4, device=DEVICE, impl="triton")
        want = ref.tube_mask_reference(3, grid, ratio, seed=9, step=4, device=DEVICE)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("grid", [(14, 14), (7, 9), (1, 5), (32, 32)])
@pytest.mark.parametrize("ratio", [0.1, 0.75, 0.9])
def test_bit_identical_random_positions(grid: tuple[int, int], ratio: float) -> None:
    """`blockwise=False` (the random_tube / random_frame ablations): the same kernel without rectangles."""
    for seed, step in [(0, 0), (2**31 + 5, 10**9)]:
        _check(3, grid, ratio, seed, step, blockwise=False)


def test_every_mask_type_bit_identical_through_dispatch() -> None:
    """The kernel serves all four MVM mask types: per-frame types are B * F rows of one launch."""
    from miles_kernels import ops

    for mask_type in ops.MASK_TYPES:
        args = (3, 4, (7, 9), 0.6)
        kwargs = dict(mask_type=mask_type, seed=21, step=8, device=DEVICE)
        got = ops.mvm_mask(*args, impl="triton", **kwargs)
        want = ops.mvm_mask(*args, impl="reference", **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mask_type
